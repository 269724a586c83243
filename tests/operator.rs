//! What operators are given besides the binary: the alert rules (checked and unit-tested
//! with promtool) and the dashboard's expressions (valid PromQL). The end-to-end test
//! `e2e_conversation` evaluates them against a real Prometheus scraping fedlink.

mod support;

use std::process::Command;

use support::prometheus::{bin, dashboard_exprs, dashboards};

fn promtool(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new(bin("promtool")).args(args).current_dir(dir).output().expect("promtool (apt-get install prometheus; scripts/test.sh does)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let text = promtool(&["check", "rules", "fedlink-alerts.yml"], &dashboards());
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    let text = promtool(&["test", "rules", "fedlink-alerts.test.yml"], &dashboards());
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn every_dashboard_expression_is_valid_promql() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 40, "only {} expressions", exprs.len());
    // As recording rules, promtool parses each.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        rules.push_str(&format!("      - record: dashboard:expr{i}\n        expr: {}\n", serde_json::to_string(e).unwrap()));
    }
    std::fs::write(dir.path().join("d.yml"), rules).unwrap();
    let text = promtool(&["check", "rules", "d.yml"], dir.path());
    assert!(text.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{text}");
    // Every fedlink_* metric the dashboard names exists in fedlink.
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    for (title, e) in &exprs {
        for name in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("fedlink_")) {
            let base = name.trim_end_matches("_bucket");
            assert!(source.contains(&format!("\"{base}\"")), "panel {title:?} uses {name}, which src/metrics.rs does not define");
        }
    }
}
