//! Every refusal the loader makes, with the position it names.

use super::*;
use std::path::PathBuf;

const HEAD: &str = "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\n";

/// A minimal valid VM document named `name`, with `extra` appended under `spec:`
/// (indented two spaces by the caller).
fn vm(name: &str, extra: &str) -> String {
    format!(
        "{HEAD}metadata:\n  name: {name}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n{extra}"
    )
}

fn load(files: &[(&str, &str)]) -> Loaded {
    let files: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    load_texts(&files)
}

fn errors_of(text: &str) -> Vec<String> {
    load(&[("t.yaml", text)])
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn one_error(text: &str) -> String {
    let errs = errors_of(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    errs.into_iter().next().unwrap_or_default()
}

#[test]
fn a_valid_document_loads_with_defaults() {
    let l = load(&[("t.yaml", &vm("web", ""))]);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let web = &l.desired.vms["web"];
    assert_eq!(web.config.power_state, PowerState::Running);
    assert_eq!(web.config.guest_os, crate::vm::GuestOs::Linux);
    assert!(!web.config.policy.allow_recreate && !web.config.policy.protected);
}

#[test]
fn unknown_fields_are_refused_at_their_position() {
    assert_eq!(
        one_error(&vm("web", "  procesors:\n    count: 2\n")),
        "t.yaml:13:3: spec.procesors: unknown field `procesors`, expected one of `boot`, `guestOS`, `health`, `memory`, `networkAdapters`, `pciDevices`, `plan9Shares`, `policy`, `powerState`, `processors`, `scsiControllers`, `serialConsoles`, `storageQos`, `vmSockets`, `vpmem`, `vsmbShares`, `windows` (did you mean `processors`?)"
    );
}

#[test]
fn duplicate_keys_point_at_the_second_copy() {
    assert_eq!(
        one_error(&vm("web", "  processors:\n    count: 2\n")),
        "t.yaml:13:3: spec.processors: duplicate key: each key may appear once"
    );
}

#[test]
fn wrong_types_name_the_field() {
    let text = vm("web", "").replace("sizeMB: 64", "sizeMB: lots");
    assert_eq!(
        one_error(&text),
        "t.yaml:12:13: spec.memory.sizeMB: invalid type: string \"lots\", expected an integer"
    );
}

/// Issue 20: a number or a boolean where a string belongs is refused, as
/// the JSON Schema refuses it, instead of being read as the text written.
#[test]
fn strings_must_be_strings() {
    let e = one_error(&vm("123", ""));
    assert!(
        e.starts_with("t.yaml:4:9: metadata.name: invalid type: integer `123`, expected a string"),
        "{e}"
    );
    let e = one_error(&vm(
        "web",
        "  plan9Shares:\n    - name: s\n      hostPath: /srv\n      allowedFiles: [a, true]\n",
    ));
    assert!(
        e.contains("spec.plan9Shares[0].allowedFiles[1]: invalid type: boolean `true`"),
        "{e}"
    );
    // Quoted, the same text is a string.
    assert!(errors_of(&vm("\"123\"", "")).is_empty());
}

#[test]
fn missing_required_fields_are_named() {
    let text = format!(
        "{HEAD}metadata:\n  name: web\nspec:\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n"
    );
    assert_eq!(
        one_error(&text),
        "t.yaml:6:3: spec.boot: required field is missing"
    );
}

#[test]
fn bad_guids_and_macs_are_refused() {
    let nic = "  networkAdapters:\n    - nicId: not-a-guid\n      endpointId: user\n      macAddress: 01-00-5E-00-00-01\n";
    assert_eq!(
        errors_of(&vm("web", nic)),
        vec![
            "t.yaml:14:7: spec.networkAdapters[0].nicId: \"not-a-guid\" is not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
            "t.yaml:16:7: spec.networkAdapters[0].macAddress: MAC address \"01-00-5E-00-00-01\" is multicast; a NIC needs a unicast address",
        ]
    );
}

#[test]
fn names_outside_the_allowed_set_are_refused() {
    assert_eq!(
        one_error(&vm("web_1", "")),
        "t.yaml:4:3: metadata.name: invalid VM name \"web_1\": a name is 1–64 characters of [A-Za-z0-9-], not starting with '-'"
    );
    let long = "a".repeat(65);
    assert!(one_error(&vm(&long, "")).contains("a name is 1–64 characters"));
    // Issue 31: validate refuses every name apply refuses (one rule).
    assert!(
        one_error(&vm("\"-rf\"", "")).contains("invalid VM name \"-rf\""),
        "{}",
        one_error(&vm("\"-rf\"", ""))
    );
}

#[test]
fn relative_paths_and_control_characters_are_refused() {
    let text = vm("web", "").replace("/k/vmlinuz", "k/vmlinuz");
    assert_eq!(
        one_error(&text),
        "t.yaml:8:7: spec.boot.linuxKernelDirect.kernel: path \"k/vmlinuz\" is relative; give an absolute path"
    );
    let text = vm("web", "").replace("/k/vmlinuz", "\"/k/vm\\x01linuz\"");
    assert_eq!(
        one_error(&text),
        "t.yaml:8:7: spec.boot.linuxKernelDirect.kernel: path contains a NUL or control character"
    );
    let text = vm("web", "").replace("/k/vmlinuz", "\"/k/vm\\0linuz\"");
    assert!(one_error(&text).contains("NUL or control character"));
}

#[test]
fn two_disks_on_one_controller_and_lun_are_refused() {
    let disks = "  scsiControllers:\n    - id: 0\n      disks:\n        - lun: 0\n          path: /d/a.vhdx\n          type: vhdx\n        - lun: 0\n          path: /d/b.vhdx\n          type: vhdx\n";
    assert_eq!(
        one_error(&vm("web", disks)),
        "t.yaml:19:11: spec.scsiControllers[0].disks[1].lun: duplicate lun 0 on controller 0 (also disks[0])"
    );
}

#[test]
fn duplicate_nic_ids_macs_shares_and_serial_ports_are_refused() {
    let extra = "  networkAdapters:
    - nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01
      endpointId: user
      macAddress: 52:54:00:00:00:01
    - nicId: 6F1C2A4E-0B7D-4C55-9A51-3F6E2D8B9C01
      endpointId: user
      macAddress: 52-54-00-00-00-01
  plan9Shares:
    - {name: src, hostPath: /srv/a}
    - {name: src, hostPath: /srv/b}
  vsmbShares:
    - {name: layers, hostPath: /srv/c}
    - {name: layers, hostPath: /srv/d}
  serialConsoles:
    - {port: 0, listenerPath: /run/a.sock}
    - {port: 0, listenerPath: /run/b.sock}
";
    assert_eq!(
        errors_of(&vm("web", extra)),
        vec![
            "t.yaml:17:7: spec.networkAdapters[1].nicId: duplicate nicId 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01 (also networkAdapters[0])",
            "t.yaml:19:7: spec.networkAdapters[1].macAddress: duplicate MAC 52-54-00-00-00-01 (also networkAdapters[0])",
            "t.yaml:22:8: spec.plan9Shares[1].name: duplicate share \"src\" (also plan9Shares[0])",
            "t.yaml:25:8: spec.vsmbShares[1].name: duplicate share \"layers\" (also vsmbShares[0])",
            "t.yaml:28:8: spec.serialConsoles[1].port: duplicate serial port 0 (also serialConsoles[0])",
        ]
    );
}

#[test]
fn numeric_bounds_are_enforced() {
    let text = vm("web", "  scsiControllers:\n    - id: 4\n      disks:\n        - {lun: 64, path: /d/a.img, type: passthrough}\n")
        .replace("count: 1", "count: 0")
        .replace("sizeMB: 64", "sizeMB: 0");
    assert_eq!(
        errors_of(&text),
        vec![
            "t.yaml:10:5: spec.processors.count: 0 is out of range 1–255",
            "t.yaml:12:5: spec.memory.sizeMB: 0 is out of range 1–1048576",
            "t.yaml:14:7: spec.scsiControllers[0].id: 4 is out of range 0–3",
            "t.yaml:16:12: spec.scsiControllers[0].disks[0].lun: 64 is out of range 0–63",
        ]
    );
}

#[test]
fn the_same_vm_name_in_two_files_names_both_files() {
    let l = load(&[("a.yaml", &vm("web", "")), ("b.yaml", &vm("web", ""))]);
    let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        vec![
            "a.yaml:4:3: metadata.name: VM \"web\" is also defined in b.yaml",
            "b.yaml:4:3: metadata.name: VM \"web\" is also defined in a.yaml",
        ]
    );
    assert!(l.desired.vms.is_empty());
    assert!(l.desired.unknown.contains("web"));
}

#[test]
fn the_same_mac_or_writable_disk_in_two_vms_is_refused() {
    let nic = |id: &str| {
        format!(
            "  networkAdapters:\n    - nicId: {id}\n      endpointId: user\n      macAddress: 52:54:00:00:00:09\n"
        )
    };
    let l = load(&[
        (
            "a.yaml",
            &vm("a", &nic("6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01")),
        ),
        (
            "b.yaml",
            &vm("b", &nic("6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c02")),
        ),
    ]);
    let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        vec![
            "a.yaml:16:7: spec.networkAdapters[0].macAddress: MAC 52-54-00-00-00-09 is also used by VM b",
            "b.yaml:16:7: spec.networkAdapters[0].macAddress: MAC 52-54-00-00-00-09 is also used by VM a",
        ]
    );
    assert_eq!(l.desired.unknown.iter().collect::<Vec<_>>(), vec!["a", "b"]);

    let disk = |ro: bool| {
        format!(
            "  scsiControllers:\n    - id: 0\n      disks:\n        - {{lun: 0, path: /d/shared.vhdx, type: vhdx, readOnly: {ro}}}\n"
        )
    };
    let l = load(&[
        ("a.yaml", &vm("a", &disk(true))),
        ("b.yaml", &vm("b", &disk(false))),
    ]);
    assert_eq!(l.errors.len(), 2);
    assert_eq!(
        l.errors[0].to_string(),
        "a.yaml:16:20: spec.scsiControllers[0].disks[0].path: /d/shared.vhdx is also attached by VM b; an image attached writable can belong to one VM only"
    );
    let l = load(&[
        ("a.yaml", &vm("a", &disk(true))),
        ("b.yaml", &vm("b", &disk(true))),
    ]);
    assert!(
        l.errors.is_empty(),
        "read-only images may be shared: {:?}",
        l.errors
    );
}

#[test]
fn all_errors_of_a_run_are_collected() {
    let l = load(&[
        ("a.yaml", &vm("a", "").replace("count: 1", "count: 0")),
        ("b.yaml", &vm("b!", "")),
        ("c.yaml", &vm("c", "")),
    ]);
    assert_eq!(l.errors.len(), 2);
    assert_eq!(l.desired.vms.keys().collect::<Vec<_>>(), vec!["c"]);
    assert_eq!(
        l.desired.unknown.iter().collect::<Vec<_>>(),
        vec!["a", "b!"]
    );
    assert_eq!(l.desired.failed_files.len(), 2);
}

#[test]
fn a_broken_document_makes_only_its_vm_unknown() {
    let text = format!(
        "{}---\n{}",
        vm("good", ""),
        vm("bad", "").replace("count: 1", "count: many")
    );
    let l = load(&[("t.yaml", &text)]);
    assert_eq!(l.errors.len(), 1);
    assert!(l.desired.vms.contains_key("good"));
    assert!(
        l.desired.unknown.contains("bad"),
        "the name is read even though the document failed"
    );
}

#[test]
fn a_syntax_error_makes_every_vm_of_the_file_unknown() {
    let text = format!("{}---\n{}---\nfoo: [\n", vm("first", ""), vm("second", ""));
    let l = load(&[("t.yaml", &text)]);
    let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("t.yaml:28:1: not valid YAML:"),
        "{errs:?}"
    );
    assert!(l.desired.vms.is_empty());
    assert_eq!(
        l.desired.unknown.iter().collect::<Vec<_>>(),
        vec!["first", "second"]
    );
}

#[test]
fn deep_nesting_is_refused_early() {
    let text = format!(
        "{HEAD}metadata: {}{}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_eq!(
        one_error(&text),
        "t.yaml:3:75: nesting deeper than 64 levels"
    );
    let text = format!("{}x\n", "- ".repeat(100_000));
    assert_eq!(
        one_error(&text),
        "t.yaml:1:129: nesting deeper than 64 levels"
    );
}

/// The expanded size the alias check gives one alias of a `bytes`-long
/// scalar anchor: its text and one node.
const fn alias_cost(bytes: usize) -> usize {
    bytes + 8
}

#[test]
fn aliases_of_a_large_anchor_in_a_list_the_schema_accepts_are_refused_before_expanding() {
    // Before the bound: 5000 copies of 4 KiB, each then echoed in full by a
    // "listed twice" error. Past 1 MiB of text the same shape took 18 GB.
    for list in ["plan9Shares", "vsmbShares"] {
        let mut share = format!(
            "  {list}:\n    - name: s\n      hostPath: /s\n      allowedFiles:\n        - &a {}\n",
            "f".repeat(4096)
        );
        share += &"        - *a\n".repeat(5000);
        let text = vm("bomb", &share);
        let budget =
            (ALIAS_EXPANSION_FACTOR as usize * text.len()).max(MIN_ALIAS_EXPANSION_BYTES as usize);
        let crossing = budget / alias_cost(4096) + 1;
        let line = 17 + crossing;
        assert_eq!(
            errors_of(&text),
            vec![format!(
                "t.yaml:{line}:11: aliases expand past 16x the file's size (anchor \"a\"); refused"
            )],
            "{list}"
        );
        let l = load(&[("t.yaml", &text)]);
        assert!(l.desired.vms.is_empty());
        assert!(
            l.desired.unknown.contains("bomb"),
            "named without expanding"
        );
    }
}

#[test]
fn a_few_small_aliases_still_load() {
    let share = "  plan9Shares:\n    - {name: a, hostPath: /s, allowedFiles: &files [x, y]}\n    - {name: b, hostPath: /t, allowedFiles: *files}\n";
    let l = load(&[("t.yaml", &vm("web", share))]);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(
        l.desired.vms["web"].config.plan9_shares[1].allowed_files,
        vec!["x", "y"]
    );
}

#[test]
fn an_alias_to_an_earlier_documents_anchor_is_one_error_not_a_panic() {
    // serde_yaml resumed mid-document after the unknown anchor and panicked
    // on the mapping's end (uvmctl validate exited 101).
    assert_eq!(
        one_error("a: &x 1\n---\nb: *x\n"),
        "t.yaml:3:4: unknown anchor \"x\": an alias must follow its anchor in the same document"
    );
}

#[test]
fn a_three_byte_syntax_error_is_one_error_at_its_position() {
    // Found by fuzzing: serde_yaml repeats its syntax error for every later
    // document, yaml-rust2 reads this as valid, and the loader went on to
    // "more than 1000 documents in one file".
    assert_eq!(
        one_error(": :\n"),
        "t.yaml:1:1: not valid YAML: did not find expected key, while parsing a block mapping"
    );
}

#[test]
fn a_syntax_error_near_the_size_limit_ends_the_file_with_one_error() {
    // One large document, broken at its end: each of the 1000 phantom
    // documents after it re-read the whole file (about a minute at 1 MiB).
    let files: String = (0..40_000)
        .map(|i| format!("        - file{i:06}.txt\n"))
        .collect();
    let share =
        format!("  plan9Shares:\n    - name: s\n      hostPath: /s\n      allowedFiles:\n{files}");
    let big = format!("{}: :\n", vm("big", &share));
    // The most documents a file may hold, the last one broken: the names of
    // all the others were each read from the start of the file. Its syntax
    // error surfaces in a 1001st document, not a file of too many.
    let comment = format!("# {}\n", "-".repeat(750));
    let many: String = (0..MAX_DOCUMENTS_PER_FILE - 1)
        .map(|i| format!("{}{comment}---\n", vm(&format!("vm-{i:03}"), "")))
        .collect();
    let many = format!("{many}foo: [\n");
    let end_of_many = many.lines().count() + 1;
    for (text, line, message, unknown) in [
        (
            &big,
            40_017,
            "did not find expected key, while parsing a block mapping",
            1,
        ),
        (
            &many,
            end_of_many,
            "did not find expected node content, while parsing a flow node",
            MAX_DOCUMENTS_PER_FILE - 1,
        ),
    ] {
        assert!(
            text.len() > 900 << 10 && text.len() < 1 << 20,
            "{}",
            text.len()
        );
        let l = load(&[("t.yaml", text)]);
        let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            vec![format!("t.yaml:{line}:1: not valid YAML: {message}")]
        );
        assert!(l.desired.vms.is_empty());
        assert_eq!(l.desired.unknown.len(), unknown);
    }
}

#[test]
fn more_documents_than_the_cap_are_one_error() {
    let empty = "---\n# nothing\n".repeat(MAX_DOCUMENTS_PER_FILE + 1);
    // A broken document past the cap is one too many, not a syntax error.
    let vms: String = (0..MAX_DOCUMENTS_PER_FILE)
        .map(|i| format!("{}---\n", vm(&format!("vm-{i}"), "")))
        .collect();
    let broken_last = format!("{vms}foo: 1\n");
    for text in [empty, broken_last] {
        let errs = errors_of(&text);
        assert_eq!(errs.len(), 1, "{:?}", &errs[..errs.len().min(3)]);
        assert_eq!(errs[0], "t.yaml: more than 1000 documents in one file");
    }
}

#[test]
fn a_byte_order_mark_is_no_content() {
    let l = load(&[("t.yaml", &format!("\u{feff}{}", vm("web", "")))]);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert!(l.desired.vms.contains_key("web"));
    // Positions on line 1 count from the first character an editor shows.
    let text = vm("web", "").replace("apiVersion: uvmctl.dev/v1alpha1", "apiVersion: [1]");
    let plain = one_error(&text);
    assert!(
        plain.starts_with("t.yaml:1:13: apiVersion: invalid type"),
        "{plain}"
    );
    assert_eq!(one_error(&format!("\u{feff}{text}")), plain);
}

#[test]
fn refused_input_is_quoted_as_a_short_escaped_excerpt() {
    // An escape sequence (YAML's `\e` is ESC) that would retitle a terminal.
    let junk = format!("\\e]0;{}", "A".repeat(5000));
    let cut = format!("\\u{{1b}}]0;{}…", "A".repeat(EXCERPT_CHARS - 9));
    let wrong_type = vm("web", "").replace("sizeMB: 64", &format!("sizeMB: \"{junk}\""));
    assert_eq!(
        one_error(&wrong_type),
        format!(
            "t.yaml:12:13: spec.memory.sizeMB: invalid type: string \"{cut}\", expected an integer"
        )
    );
    // YAML caps an implicit key at 1024 characters.
    let long_key = "k".repeat(1000);
    let unknown = one_error(&vm("web", &format!("  {long_key}: 1\n")));
    assert!(
        unknown.starts_with(&format!(
            "t.yaml:13:3: spec: unknown field `{}…`, expected one of `boot`",
            "k".repeat(EXCERPT_CHARS)
        )),
        "{unknown}"
    );
    let variant = one_error(&vm("web", &format!("  powerState: {}\n", "R".repeat(5000))));
    assert!(
        variant.contains(&format!(
            "unknown variant `{}…`, expected",
            "R".repeat(EXCERPT_CHARS)
        )),
        "{variant}"
    );
    let name = one_error(&vm(&format!("\"{junk}\""), ""));
    assert_eq!(
        name,
        format!(
            "t.yaml:4:3: metadata.name: invalid VM name \"\\u{{1b}}]0;{}\"…: a name is 1–64 characters of [A-Za-z0-9-], not starting with '-'",
            "A".repeat(36)
        )
    );
    for e in [wrong_type, unknown, variant, name]
        .iter()
        .map(|t| errors_of(t))
    {
        assert!(
            e.iter().all(|e| e.len() < 400 && !e.contains('\u{1b}')),
            "{e:?}"
        );
    }
}

#[test]
fn empty_documents_are_no_vms() {
    let l = load(&[(
        "t.yaml",
        &format!("# just a comment\n---\n{}---\n", vm("web", "")),
    )]);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.desired.vms.len(), 1);
}

#[test]
fn values_are_canonicalized() {
    let nic = "  networkAdapters:\n    - nicId: '{6F1C2A4E-0B7D-4C55-9A51-3F6E2D8B9C01}'\n      endpointId: tap0\n      macAddress: 52:54:00:ab:cd:ef\n";
    let l = load(&[("t.yaml", &vm("web", nic))]);
    let n = &l.desired.vms["web"].config.network_adapters[0];
    assert_eq!(n.nic_id, "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01");
    assert_eq!(n.mac_address, "52-54-00-AB-CD-EF");
}

#[test]
fn vsock_and_hvsocket_listeners_need_their_own_address() {
    let extra = "  vmSockets:\n    - {type: vsock, listenerPath: /run/a.sock}\n    - {type: hvsocket, port: 5, listenerPath: /run/b.sock}\n";
    assert_eq!(
        errors_of(&vm("web", extra)),
        vec![
            "t.yaml:14:8: spec.vmSockets[0].port: a vsock listener needs a port",
            "t.yaml:15:8: spec.vmSockets[1].serviceId: an hvsocket listener needs a serviceId GUID",
            "t.yaml:15:24: spec.vmSockets[1].port: an hvsocket listener is addressed by serviceId, not port",
        ]
    );
}

mod on_disk {
    use super::*;
    use std::fs;
    #[cfg(unix)]
    use std::path::Path;

    #[test]
    fn walks_recursively_and_skips_hidden_files_and_editor_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("team/a")).expect("mkdir");
        fs::create_dir_all(root.join(".git")).expect("mkdir");
        fs::write(root.join("team/a/web.yaml"), vm("web", "")).expect("write");
        fs::write(root.join("db.yml"), vm("db", "")).expect("write");
        for junk in [
            ".web.yaml.swp",
            "web.yaml~",
            "4913",
            ".#web.yaml",
            ".git/x.yaml",
            "notes.txt",
            ".hidden.yaml",
        ] {
            fs::write(root.join(junk), "this: [is not a spec").expect("write");
        }
        let l = load_dir(root);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.desired.vms.keys().collect::<Vec<_>>(), vec!["db", "web"]);
    }

    // A FIFO: unix's.
    #[cfg(unix)]
    #[test]
    fn refuses_oversized_and_non_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::write(
            root.join("big.yaml"),
            "#".repeat(MAX_SPEC_FILE_BYTES as usize + 1),
        )
        .expect("write");
        let fifo = root.join("pipe.yaml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        let l = load_dir(root);
        let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            vec![
                format!(
                    "{}: file is 1048577 bytes, over the 1048576-byte limit",
                    root.join("big.yaml").display()
                ),
                format!("{}: not a regular file", fifo.display()),
            ]
        );
        assert_eq!(l.desired.failed_files.len(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_out_of_the_spec_directory_is_refused_by_name_unread() {
        let outside = tempfile::tempdir().expect("tempdir");
        let shadow = outside.path().join("shadow");
        fs::write(
            &shadow,
            "root:$6$SECRETSALT$0123456789abcdef:19000:0:99999:7:::\n",
        )
        .expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::os::unix::fs::symlink(&shadow, root.join("evil.yaml")).expect("symlink");
        fs::create_dir(root.join("team")).expect("mkdir");
        // Both temporary directories share a parent.
        let up = Path::new("../..").join(outside.path().file_name().expect("named"));
        std::os::unix::fs::symlink(up.join("shadow"), root.join("team/relative.yml"))
            .expect("symlink");
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling.yaml")).expect("symlink");
        fs::write(root.join("web.yaml"), vm("web", "")).expect("write");
        let l = load_dir(root);
        let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            vec![
                format!(
                    "{}: symlink that does not resolve (No such file or directory (os error 2)); not read",
                    root.join("dangling.yaml").display()
                ),
                format!(
                    "{}: symlink to a file outside the spec directory; not read",
                    root.join("evil.yaml").display()
                ),
                format!(
                    "{}: symlink to a file outside the spec directory; not read",
                    root.join("team/relative.yml").display()
                ),
            ]
        );
        assert!(
            errs.iter()
                .all(|e| !e.contains("SECRET") && !e.contains("root:"))
        );
        assert!(l.desired.vms.contains_key("web"));
        assert_eq!(l.desired.failed_files.len(), 3, "pruning stays blocked");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_to_a_spec_inside_the_directory_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // The target is in a hidden directory, so it is loaded once, by the link.
        fs::create_dir(root.join(".shared")).expect("mkdir");
        fs::write(root.join(".shared/web.yaml"), vm("web", "")).expect("write");
        std::os::unix::fs::symlink(".shared/web.yaml", root.join("web.yaml")).expect("symlink");
        // A root given through a symlink is resolved before the comparison.
        let link_root = tempfile::tempdir().expect("tempdir");
        let via = link_root.path().join("specs");
        std::os::unix::fs::symlink(root, &via).expect("symlink");
        for r in [root, via.as_path()] {
            let l = load_dir(r);
            assert!(l.errors.is_empty(), "{:?}", l.errors);
            assert_eq!(l.desired.vms["web"].file, r.join("web.yaml"));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_spec_file_named_on_the_command_line_may_be_a_symlink_anywhere() {
        let elsewhere = tempfile::tempdir().expect("tempdir");
        fs::write(elsewhere.path().join("web.yaml"), vm("web", "")).expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("web.yaml");
        std::os::unix::fs::symlink(elsewhere.path().join("web.yaml"), &link).expect("symlink");
        let l = load_dir(&link);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert!(l.desired.vms.contains_key("web"));
    }

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_spec_set() {
        let l = load_dir(std::path::Path::new("/nonexistent/uvmctl-specs"));
        assert_eq!(l.errors.len(), 1);
        assert!(
            !l.desired.failed_files.is_empty(),
            "pruning must stay blocked"
        );
    }

    #[test]
    fn example_specs_in_the_repository_are_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["specs", "examples/recorded-host"] {
            let l = load_dir(&root.join(dir));
            assert!(l.errors.is_empty(), "{dir}: {:?}", l.errors);
            assert!(!l.desired.vms.is_empty());
        }
    }
}

/// Found by fuzzing the loader (issue 10): libyaml places an error at the end
/// of a file that lacks its last newline one line past the file, so the
/// one-byte file `[` was reported at 2:1. Every position points inside the file.
#[test]
fn fuzz_a_syntax_error_at_the_end_without_a_last_newline_points_inside_the_file() {
    let err = one_error("[");
    assert!(err.starts_with("t.yaml:1:2: not valid YAML"), "{err}");
    let err = one_error("a: 1\nb: {");
    assert!(err.starts_with("t.yaml:2:5: not valid YAML"), "{err}");
    // With its newline the end is the empty last line.
    let err = one_error("a: 1\nb: {\n");
    assert!(err.starts_with("t.yaml:3:1: not valid YAML"), "{err}");
}

/// Found by fuzzing the loader (issue 10): serde_yaml panicked on the
/// 11-byte file `[?&poe:*ne]` (libyaml reads an anchor `a`, a `:` and an
/// alias to an anchor that does not exist; yaml-rust2 reads one anchor named
/// `poe:*ne`, so the alias check saw nothing). Under `apply` the panic ended
/// the whole load, every file with it. Now it is that file's error alone.
#[test]
fn fuzz_a_yaml_parser_panic_is_the_files_error_and_spares_the_other_files() {
    for text in ["[?&poe:*ne]", "[&a:*b]", "x: 1\n---\n[&a:*b]\n"] {
        let l = load(&[("bad.yaml", text), ("good.yaml", &vm("good", ""))]);
        let errs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 1, "{text:?}: {errs:#?}");
        assert!(
            errs[0].starts_with("bad.yaml:") && errs[0].contains("YAML parser failed"),
            "{text:?}: {errs:#?}"
        );
        assert!(
            l.desired.vms.contains_key("good"),
            "the other file still loads"
        );
    }
}

fn placed_vm(name: &str, host: &str, extra: &str) -> String {
    vm(name, extra).replace(
        &format!("  name: {name}\n"),
        &format!("  name: {name}\n  labels:\n    host: {host}\n"),
    )
}

fn load_placed(files: &[(&str, &str)], selector: &str) -> Loaded {
    let dir = tempfile::tempdir().expect("tempdir");
    for (p, t) in files {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, t).expect("write");
    }
    let placement = Placement {
        selector: selector.parse().expect("selector"),
        path: None,
    };
    let mut l = load_dir_placed(dir.path(), Some(&placement));
    // Paths in errors without the temporary directory.
    for e in &mut l.errors {
        e.file = e
            .file
            .strip_prefix(dir.path())
            .unwrap_or(&e.file)
            .to_path_buf();
    }
    l
}

/// Issue 17: a host keeps only the VMs its placement selects; names and
/// MACs stay unique over every spec, a writable image only among one
/// host's VMs.
#[test]
fn placement_keeps_this_hosts_vms_and_checks_fleet_wide_invariants() {
    let nic = |mac: &str| {
        format!(
            "  networkAdapters:\n    - nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01\n      endpointId: user\n      macAddress: {mac}\n"
        )
    };
    let disk = "  scsiControllers:\n    - id: 0\n      disks:\n        - {lun: 0, path: /var/lib/uvmctl/disks/data.img, type: passthrough}\n";
    let l = load_placed(
        &[
            ("a/web.yaml", &placed_vm("web", "a", disk)),
            ("b/db.yaml", &placed_vm("db", "b", disk)),
            ("b/cache.yaml", &placed_vm("cache", "b", "")),
        ],
        "host=a",
    );
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.desired.vms.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(
        l.desired.elsewhere.iter().collect::<Vec<_>>(),
        ["cache", "db"]
    );
    // The same image writable twice on one host is still refused.
    let l = load_placed(
        &[
            ("a/web.yaml", &placed_vm("web", "a", disk)),
            ("a/db.yaml", &placed_vm("db", "a", disk)),
        ],
        "host=a",
    );
    assert_eq!(l.errors.len(), 2, "{:?}", l.errors);
    // A name or a MAC on two hosts is refused on every host.
    let l = load_placed(
        &[
            ("a/web.yaml", &placed_vm("web", "a", "")),
            ("b/web.yaml", &placed_vm("web", "b", "")),
        ],
        "host=a",
    );
    assert!(
        l.errors
            .iter()
            .any(|e| e.to_string().contains("also defined in")),
        "{:?}",
        l.errors
    );
    assert!(l.desired.vms.is_empty());
    let l = load_placed(
        &[
            (
                "a/web.yaml",
                &placed_vm("web", "a", &nic("52-54-00-00-00-01")),
            ),
            (
                "b/db.yaml",
                &placed_vm("db", "b", &nic("52-54-00-00-00-01")),
            ),
        ],
        "host=a",
    );
    assert!(
        l.errors
            .iter()
            .any(|e| e.to_string().contains("MAC 52-54-00-00-00-01 is also used")),
        "{:?}",
        l.errors
    );
}

/// Issue 30: under label placement, one broken spec made every host refuse
/// the revision, though it could be one host's only. Where its placement
/// can still be read (its labels, its path), it is that host's alone.
#[test]
fn a_broken_spec_of_another_host_is_that_hosts_alone() {
    let broken_b = placed_vm("db", "b", "").replace("sizeMB: 64", "sizeMB: lots");
    let l = load_placed(
        &[
            ("a/web.yaml", &placed_vm("web", "a", "")),
            ("b/db.yaml", &broken_b),
        ],
        "host=a",
    );
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.errors_elsewhere.len(), 1, "{:?}", l.errors_elsewhere);
    assert!(l.desired.failed_files.is_empty(), "prunes are not blocked");
    assert_eq!(l.desired.vms.keys().collect::<Vec<_>>(), ["web"]);
    assert!(l.desired.unknown.is_empty());
    assert_eq!(
        l.desired.unknown_elsewhere.iter().collect::<Vec<_>>(),
        ["db"],
        "a VM of its name here is still left alone"
    );
    // On host b it is an error, as before.
    let l = load_placed(
        &[
            ("a/web.yaml", &placed_vm("web", "a", "")),
            ("b/db.yaml", &broken_b),
        ],
        "host=b",
    );
    assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
    assert!(l.desired.unknown.contains("db"));
    // Labels that cannot be read, or a file that is not YAML at all: it
    // could be anyone's.
    let unreadable = placed_vm("db", "b", "")
        .replace(
            "    host: b
",
            "    host: [b]
",
        )
        .replace("sizeMB: 64", "sizeMB: lots");
    for text in [unreadable.as_str(), "apiVersion: [\n"] {
        let l = load_placed(
            &[
                ("a/web.yaml", &placed_vm("web", "a", "")),
                ("b/db.yaml", text),
            ],
            "host=a",
        );
        assert!(!l.errors.is_empty(), "{text}: {:?}", l.errors);
        assert!(l.errors_elsewhere.is_empty());
        assert!(!l.desired.failed_files.is_empty());
    }
}

#[test]
fn labels_follow_kubernetes_syntax_and_are_strings() {
    let with = |labels: &str| {
        vm("web", "").replace(
            "  name: web\n",
            &format!("  name: web\n  labels:\n{labels}"),
        )
    };
    assert!(
        errors_of(&with(
            "    host: web-01\n    example.com/zone: a\n    empty: \"\"\n"
        ))
        .is_empty()
    );
    let e = one_error(&with("    bad key: x\n"));
    assert!(e.contains("metadata.labels: label name \"bad key\""), "{e}");
    let e = one_error(&with("    host: -x\n"));
    assert!(e.contains("label value \"-x\""), "{e}");
    let e = one_error(&with("    Example.com/x: y\n"));
    assert!(e.contains("DNS subdomain"), "{e}");
    let e = one_error(&with("    port: 8080\n"));
    assert!(
        e.contains("invalid type: integer `8080`, expected a string"),
        "{e}"
    );
}
