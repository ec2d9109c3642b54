//! Generates the vmservice protocol code (messages and ttrpc service) from
//! `proto/vmservice.proto` with `ttrpc-codegen`, which needs no `protoc`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=proto/vmservice.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("vmservice");
    std::fs::create_dir_all(&out).expect("create the protocol output directory");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["proto/vmservice.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("generate the vmservice protocol code");

    // The generator writes the service name as `vmservice.Vm`; the protocol
    // (and every Go peer) says `vmservice.VM`, and ttrpc matches it exactly.
    let service = out.join("vmservice_ttrpc.rs");
    let text = std::fs::read_to_string(&service).expect("read the generated service");
    let fixed = text.replace("\"vmservice.Vm\"", "\"vmservice.VM\"");
    assert!(
        fixed.contains("\"vmservice.VM\"") && !fixed.contains("\"vmservice.Vm\""),
        "the generated service does not name vmservice.VM"
    );
    std::fs::write(&service, fixed).expect("write the fixed service");

    // The generated files begin with inner attributes, which `include!`
    // refuses: a module file of our own points at them instead.
    let wrapper = format!(
        "#[path = {:?}]\npub mod vmservice;\n#[path = {:?}]\npub mod vmservice_ttrpc;\n",
        out.join("vmservice.rs"),
        service
    );
    std::fs::write(out.join("protocol.rs"), wrapper).expect("write the protocol module");
}
