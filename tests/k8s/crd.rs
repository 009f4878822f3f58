//! The CRD: `crdgen` prints what is committed (and what the chart ships).

#[test]
fn crdgen_prints_the_committed_crds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-coordinator"))
        .arg("crdgen")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    for path in [
        "crds/appproxyroute.yaml",
        "charts/appproxy-coordinator/crds/appproxyroute.yaml",
    ] {
        let committed = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_default();
        assert!(
            committed == printed,
            "{path} differs from `appproxy-coordinator crdgen`; regenerate it with \
             `cargo run -- crdgen > {path}`"
        );
    }
}
