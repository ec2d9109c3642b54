//! Interoperability: an independent vmservice client in Go (containerd/ttrpc,
//! code from protoc and the gogo ttrpc plugin, all from Debian packages;
//! `tests/interop/client.go`) starts `uvmctl serve` exactly as hcsshim starts
//! a server and drives a real QEMU VM through it. `scripts/test` installs the
//! Go tools and requires this test (`UVMCTL_INTEROP_REQUIRED`); elsewhere it
//! says it was skipped when they are missing.

use crate::host::Host;
use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the Go client in a GOPATH of its own under `dir`.
fn build_client(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pkg = dir.join("src/uvmctl-interop");
    std::fs::create_dir_all(pkg.join("vmservice")).expect("gopath");
    std::fs::copy(root.join("tests/interop/client.go"), pkg.join("client.go"))
        .expect("client source");
    let out = Command::new("protoc")
        .arg("-I")
        .arg(root.join("proto"))
        .args(["-I", "/usr/include"])
        .arg(format!(
            "--gogottrpc_out=plugins=ttrpc,Mgoogle/protobuf/empty.proto=github.com/gogo/protobuf/types,Mgoogle/protobuf/struct.proto=github.com/gogo/protobuf/types:{}",
            pkg.join("vmservice").display()
        ))
        .arg(root.join("proto/vmservice.proto"))
        .output()
        .expect("protoc runs");
    assert!(
        out.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = dir.join("client");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("uvmctl-interop")
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:/usr/share/gocode", dir.display()))
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "")
        .output()
        .expect("go runs");
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

#[test]
fn a_go_ttrpc_client_drives_uvmctl_serve_started_the_hcsshim_way() {
    let tools = ["go", "protoc", "protoc-gen-gogottrpc"];
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("UVMCTL_INTEROP_REQUIRED").is_none(),
            "missing {missing:?} (scripts/test installs them)"
        );
        eprintln!("interop test skipped: missing {missing:?} (scripts/test installs them)");
        return;
    }
    let h = Host::new();
    let go = tempfile::tempdir().expect("tempdir");
    let client = build_client(go.path());
    let disk = h.raw_image("interop.img", 16);
    let out = Command::new(&client)
        .arg(h.path("img/interop.sock"))
        .arg(h.kernel())
        .arg(h.guest.join("initrd.img"))
        .arg(&disk)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_uvmctl"))
        .arg("serve")
        .arg("--state-dir")
        .arg(h.path("state"))
        .arg("--allow-root")
        .arg(h.path("img"))
        .arg("--allow-root")
        .arg(&h.guest)
        .args(["--accel", "tcg"])
        .output()
        .expect("the Go client runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let all = format!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "STDOUT_CLOSED",
        "CAP Scsi add=true remove=true update=false",
        "GUEST Linux",
        "BAD_CREATE InvalidArgument",
        "CREATED",
        "STATE running",
        "DISK_ADDED",
        "CONTROLLERS 1",
        "MEMORY 268435456",
        "PAUSE OK",
        "WAITED OK",
        "RESUME_AFTER_TEARDOWN FailedPrecondition",
        "SERVER_EXITED",
    ] {
        assert!(lines.contains(&want), "no {want:?} in:\n{all}");
    }
    assert!(
        !h.path("state/interop").exists(),
        "TeardownVM removed the VM"
    );
}
