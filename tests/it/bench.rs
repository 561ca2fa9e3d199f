//! `provline bench --json`: machine-readable throughput of every mode.

use crate::util::*;

#[test]
fn bench_json_reports_positive_rates_for_station_key_and_csr_modes() {
    let tmp = tempdir();
    let r = provline(tmp.path(), &["bench", "--count", "200", "--json"]);
    r.expect_code(0);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("bench --json stdout is not JSON ({e})\n{r}"));
    let modes = v
        .as_array()
        .unwrap_or_else(|| panic!("expected a JSON array\n{r}"));
    assert!(!modes.is_empty(), "no modes\n{r}");
    for m in modes {
        for field in ["mode", "key"] {
            assert!(m[field].is_string(), "{field} missing or not a string: {m}");
        }
        assert!(
            m["threads"].as_u64().is_some_and(|t| t >= 1),
            "threads: {m}"
        );
        for rate in ["certs_per_sec", "raw_ceiling_per_sec"] {
            let x = m[rate].as_f64().unwrap_or(f64::NAN);
            assert!(
                x.is_finite() && x > 0.0,
                "{rate} must be a positive number: {m}"
            );
        }
    }
    let names: Vec<String> = modes
        .iter()
        .map(|m| m["mode"].as_str().unwrap_or("").to_lowercase())
        .collect();
    assert!(
        names.iter().any(|n| n.contains("station")),
        "no station-key mode: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("csr")),
        "no outside-CSR mode: {names:?}"
    );
}
