// Helpers shared by the test support code and the `fedlink-load` binary (which includes this
// file with `include!`, so no inner doc comments here).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// PEM files of a certificate and its private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A private certificate authority made for one test. (This file is also compiled into the
/// load generator, which does not use it.)
#[allow(dead_code)]
pub struct TestCa {
    /// The CA certificate (PEM), what a client must trust.
    pub pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

#[allow(dead_code)]
impl TestCa {
    /// A new CA.
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "fedlink test private CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { pem: cert.pem(), cert, key }
    }

    /// Writes a certificate for `names` signed by this CA into `dir` as `tls.crt` /
    /// `tls.key`.
    pub fn issue(&self, dir: &Path, names: &[&str]) -> TlsFiles {
        let params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("leaf params");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf certificate");
        let files = TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
        std::fs::write(&files.cert, cert.pem()).expect("writing tls.crt");
        std::fs::write(&files.key, key.serialize_pem()).expect("writing tls.key");
        files
    }
}

/// Writes a self-signed certificate for `names` (DNS names or IP literals) into
/// `dir` as `tls.crt` / `tls.key` (PEM).
pub fn self_signed_cert(dir: &Path, names: &[&str]) -> TlsFiles {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed certificate");
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::fs::write(&files.cert, ck.cert.pem()).expect("writing tls.crt");
    std::fs::write(&files.key, ck.key_pair.serialize_pem()).expect("writing tls.key");
    files
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for path
/// segments and query values such as room ids, event ids and server names).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").unwrap();
        }
    }
    out
}
