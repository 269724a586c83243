//! fedlink's own ed25519 signing key, stored in Synapse's key file format so admins can move
//! keys between servers: one line `ed25519 <version> <unpadded base64 seed>`.
//!
//! The file is created with mode 0600 when missing. A key id is never reused for another key:
//! generation always picks a fresh random version.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD_NO_PAD, Engine};
use ruma::signatures::{KeyPair, Signature};

/// Problems with the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file's content is not a Synapse signing key.
    #[error("key file {path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// fedlink's signing key.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    /// The key version, e.g. `a_AbCd`; the key id is `ed25519:<version>`.
    version: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the seed.
        f.debug_struct("SigningKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh random key with a random version `a_XXXX`.
    pub fn generate() -> Self {
        use rand::Rng;
        let mut rng = rand::rngs::OsRng;
        let mut seed = [0u8; 32];
        rng.fill(&mut seed);
        let version: String = (0..4).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect();
        Self { key: ed25519_dalek::SigningKey::from_bytes(&seed), version: format!("a_{version}") }
    }

    /// Parse Synapse's format (the first non-empty line is used).
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeyFileError> {
        let bad = |reason: &str| KeyFileError::Format { path: path.to_owned(), reason: reason.to_owned() };
        let line = text.lines().map(str::trim).find(|l| !l.is_empty()).ok_or_else(|| bad("empty file"))?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [alg, version, seed] = parts[..] else {
            return Err(bad("expected `ed25519 <version> <base64 seed>`"));
        };
        if alg != "ed25519" {
            return Err(bad("only ed25519 keys are supported"));
        }
        if version.is_empty() || !version.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad("key version must be alphanumeric or _"));
        }
        let seed = STANDARD_NO_PAD
            .decode(seed.trim_end_matches('='))
            .map_err(|_| bad("seed is not base64"))?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| bad("seed must be 32 bytes"))?;
        Ok(Self { key: ed25519_dalek::SigningKey::from_bytes(&seed), version: version.to_owned() })
    }

    /// The file content in Synapse's format.
    pub fn to_file_string(&self) -> String {
        format!("ed25519 {} {}\n", self.version, STANDARD_NO_PAD.encode(self.key.to_bytes()))
    }

    /// Load `path`, or generate and write a new key there if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                key.write_new(path)?;
                tracing::info!(path = %path.display(), key_id = %key.key_id(), "generated a new signing key");
                Ok(key)
            }
            Err(source) => Err(KeyFileError::Io { path: path.to_owned(), source }),
        }
    }

    /// Write to a new file (refusing to overwrite an existing key).
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let io = |source| KeyFileError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io)?;
        f.write_all(self.to_file_string().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// `ed25519:<version>`
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.version)
    }

    /// The version part of the key id.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Unpadded base64 of the public key, as served in `verify_keys`.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.key.verifying_key().as_bytes())
    }

    /// Raw public key bytes.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

impl KeyPair for SigningKey {
    fn sign(&self, message: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        let sig = self.key.sign(message);
        let id = ruma::SigningKeyId::parse(self.key_id()).expect("key id is validated at construction");
        Signature::new(id, sig.to_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_synapse_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/signing.key");
        let a = SigningKey::load_or_create(&path).unwrap();
        let b = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.public_key(), b.public_key());
        let text = std::fs::read_to_string(&path).unwrap();
        let parts: Vec<&str> = text.trim().split(' ').collect();
        assert_eq!(parts[0], "ed25519");
        assert!(parts[1].starts_with("a_"));
        assert!(!parts[2].ends_with('='), "Synapse writes unpadded base64");
        // Refuses to overwrite.
        assert!(SigningKey::generate().write_new(&path).is_err());
    }

    #[test]
    fn parses_a_synapse_key_and_rejects_garbage() {
        // Written by Synapse's signedjson `write_signing_keys`; its public key as signedjson
        // encodes it.
        let k = SigningKey::parse("ed25519 a_Abc1 4FrqnFvjgfBK2VO4qfHlLLt1YLog7X1nsUYbffRpPx8\n", Path::new("x")).unwrap();
        assert_eq!(k.key_id(), "ed25519:a_Abc1");
        assert_eq!(k.public_key_base64(), "l2VHiCshtUtpwqjYpmTCMhEPUXXAtKKkKMlcqbJ7Lc0");
        for bad in ["", "ed25519 a_x", "rsa a_x AAAA", "ed25519 a_x !!!", "ed25519 a_x AAAA"] {
            assert!(SigningKey::parse(bad, Path::new("x")).is_err(), "{bad}");
        }
        assert!(!format!("{k:?}").contains("4FrqnF"));
    }
}
