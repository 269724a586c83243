//! The `fedlink` command line: generate-key, check-config (good and bad configs, secrets
//! redacted, the bad key named), and replay.

use std::process::Command;

fn fedlink(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedlink"));
    c.args(args).env_remove("FEDLINK_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const GOOD: &str = r#"
server_name = "localhost:8490"
[tls]
cert = "tls.crt"
key = "tls.key"
[storage]
path = "db"
[admin]
token = "a-very-secret-token-123"
"#;

#[test]
fn generate_key_writes_a_synapse_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    let p = path.to_str().unwrap();
    let (code, out, _) = fedlink(&["generate-key", "-o", p], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("ed25519:a_"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("ed25519 a_"));
    let (code, _, err) = fedlink(&["generate-key", "-o", p], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("k.key"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the existing key is untouched");
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, GOOD).unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, _) = fedlink(&["check-config", "-c", c], &[("FEDLINK_BOT__LOCALPART", "linker")]);
    assert_eq!(code, 0);
    assert!(out.contains("localpart = \"linker\""), "env override applied: {out}");
    assert!(!out.contains("a-very-secret-token-123"), "secret printed: {out}");
    assert!(out.contains("<redacted>"));
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, GOOD).unwrap();
    let c = cfg.to_str().unwrap();
    for (var, val, key) in [
        ("FEDLINK_LISTEN__METRICS", "not-an-address", "listen.metrics"),
        ("FEDLINK_SERVER_NAME", "bad name", "server_name"),
        ("FEDLINK_FEDERATION__VERIFY_TLS", "\"maybe\"", "verify_tls"),
        ("FEDLINK_ADMIN__TOKEN", "short", "admin.token"),
    ] {
        let (code, _, err) = fedlink(&["check-config", "-c", c], &[(var, val)]);
        assert_ne!(code, 0, "{var}={val} must be refused");
        assert!(err.contains(key), "{var}: error should name {key}: {err}");
    }
    std::fs::write(&cfg, "server_name = \"x\"\n[tls]\ncert = \"a\"\n").unwrap();
    let (code, _, err) = fedlink(&["check-config", "-c", c], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("key"), "missing tls.key is named: {err}");
    let (code, _, err) = fedlink(&["check-config", "-c", "/nonexistent/fedlink.toml"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/fedlink.toml"), "{err}");
}

#[test]
fn replay_rebuilds_views_from_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, GOOD).unwrap();
    let (code, out, err) = fedlink(&["replay", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 0 log entries into 0 rooms"), "{out}");
}

/// `FEDLINK_LOG_FORMAT=json` writes one JSON object per line, and by default only
/// fedlink's own lines are at `info` (other crates at `warn`).
#[test]
fn logs_are_json_lines_on_request_and_only_fedlinks_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, GOOD).unwrap();
    let (code, _, err) = fedlink(&["replay", "-c", cfg.to_str().unwrap()], &[("FEDLINK_LOG_FORMAT", "json")]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let ready = lines.iter().find(|l| l["message"] == "views ready").unwrap_or_else(|| panic!("no `views ready` line in {err}"));
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["folded"], 0);
    assert!(lines.iter().all(|l| l["target"].as_str().is_some_and(|t| t.starts_with("fedlink")) || l["level"] == "WARN" || l["level"] == "ERROR"), "{err}");
    let (_, _, text) = fedlink(&["replay", "-c", cfg.to_str().unwrap()], &[]);
    assert!(text.contains("views ready") && !text.trim_start().starts_with('{'), "{text}");
}

/// The load generator drives a real fedlink binary over HTTPS end to end: every PDU of a
/// small run is accepted and it reports the figures the README quotes.
#[test]
fn the_load_generator_runs_against_the_fedlink_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedlink-load"))
        .args(["--members", "40", "--messages", "100", "--batch", "20", "--rooms", "2", "--fedlink", env!("CARGO_BIN_EXE_fedlink")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fedlink-load failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for figure in ["messages, 3-member room: 100 PDUs", "growth to 40 members", "KiB per membership event", "messages, 42-member room: 100 PDUs", "fedlink RSS", "the bot joined 2 rooms"] {
        assert!(stdout.contains(figure), "no `{figure}` in:\n{stdout}");
    }
}

/// The shipped production template passes `check-config` once its secret file exists, and
/// keeps the production settings (TLS checked, an allow-list, no private networks).
#[test]
fn the_production_template_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let template = concat!(env!("CARGO_MANIFEST_DIR"), "/config/production.toml");
    let env = [("FEDLINK_ADMIN__TOKEN_FILE", token.to_str().unwrap())];
    // As shipped, its placeholder tokens are refused, naming the key.
    let (code, _, err) = fedlink(&["check-config", "-c", template], &env);
    assert_ne!(code, 0);
    assert!(err.contains("as_token") && err.contains("placeholder"), "{err}");
    // With the tokens generated, it checks out.
    let text = std::fs::read_to_string(template).unwrap();
    let mut n = 0;
    let filled: String = text
        .split('"')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 && part.starts_with('<') {
                n += 1;
                format!("{n:02}-generated-token-0123456789abcdef")
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\"");
    assert_eq!(n, 4, "four placeholder tokens in the template");
    let filled_path = dir.path().join("fedlink.toml");
    std::fs::write(&filled_path, filled).unwrap();
    let (code, out, err) = fedlink(&["check-config", "-c", filled_path.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
    for setting in ["verify_tls = true", "allow_private_networks = false", "self_signed = false", "\"kiwi.example.org\""] {
        assert!(out.contains(setting), "{setting} missing in {out}");
    }
    assert!(!out.contains("0123456789abcdef0123456789abcdef"), "the token is printed: {out}");
    assert!(!out.contains("generated-token"), "registration tokens are printed: {out}");
}

/// The README's run command is `cargo run --release -- run -c config/example.toml`: with a
/// second binary in the crate (`fedlink-load`), cargo picks one only through `default-run`
/// (without it the command fails with "could not determine which binary to run").
#[test]
fn the_readmes_run_command_picks_the_server_binary() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- run -c config/example.toml"), "the README's run command changed: update this test");
    let manifest: toml::Table = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap().parse().unwrap();
    let bins = manifest.get("bin").and_then(|b| b.as_array()).map_or(0, |b| b.len());
    let default = manifest["package"].get("default-run").and_then(|d| d.as_str());
    assert!(bins <= 1 || default == Some("fedlink"), "{bins} binaries and default-run {default:?}");
}
