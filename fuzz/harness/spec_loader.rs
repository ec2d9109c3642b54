//! The spec loader on raw bytes: what `load_dir` does with each file, through
//! `load_texts` (the same per-file path, less the disk).
//!
//! Properties, not only "no panic":
//! - time and memory stay within a fixed budget per input byte;
//! - every error carries a position inside the file (or concerns the whole
//!   file: its size, its number of documents);
//! - a file that loads re-loads from its canonical rendering to the same model.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uvmctl::spec::{API_VERSION, KIND, Loaded, Metadata, VmDocument, load_texts};

/// Counts live heap bytes and their peak, so the harness can hold the
/// loader to a memory budget per input byte.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Loading may take this long plus [`TIME_PER_BYTE`] per byte. The loader
/// runs at tens of nanoseconds a byte; this is hundreds of times that, so
/// only a superlinear path (a re-parse per document, an alias bomb) trips it.
/// The suite replays the corpus in an unoptimized build: ten times that.
const TIME_BASE: Duration = Duration::from_millis(if cfg!(debug_assertions) { 2500 } else { 250 });
const TIME_PER_BYTE: Duration =
    Duration::from_micros(if cfg!(debug_assertions) { 200 } else { 20 });
/// Heap the loader may hold at its peak: this plus [`MEMORY_PER_BYTE`] per
/// input byte (parsed YAML and serde's values are a few dozen times the text).
const MEMORY_BASE: usize = 16 << 20;
const MEMORY_PER_BYTE: usize = 256;

fn load(text: &str) -> (Loaded, Duration, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let started = Instant::now();
    let loaded = load_texts(&[(PathBuf::from("fuzz.yaml"), text.to_string())]);
    let took = started.elapsed();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    (loaded, took, peak)
}

/// Checks the properties on one input; panics when one does not hold.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (loaded, took, peak) = load(text);

    let budget = TIME_BASE + TIME_PER_BYTE * u32::try_from(text.len()).unwrap_or(u32::MAX);
    assert!(
        took <= budget,
        "{} bytes took {took:?}, over {budget:?}",
        text.len()
    );
    let memory = MEMORY_BASE + MEMORY_PER_BYTE * text.len();
    assert!(
        peak <= memory,
        "{} bytes peaked at {peak} heap bytes, over {memory}",
        text.len()
    );

    let lines: Vec<&str> = text.split('\n').collect();
    for e in &loaded.errors {
        if e.line == 0 {
            assert!(
                e.message.contains("-byte limit") || e.message.contains("documents in one file"),
                "an error without a position: {e}"
            );
            continue;
        }
        let line = lines.get(e.line - 1).unwrap_or_else(|| {
            panic!(
                "error on line {} of a {}-line file: {e}",
                e.line,
                lines.len()
            )
        });
        // A column may point just past the line's last character (at its
        // end). The loader drops a byte order mark at the start of the file.
        let line = if e.line == 1 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        let width = line.chars().count();
        assert!(
            e.column >= 1 && e.column <= width + 1,
            "error at column {} of a {width}-character line: {e}",
            e.column
        );
    }

    if loaded.errors.is_empty() && !loaded.desired.vms.is_empty() {
        // The canonical rendering (what `export` writes) loads to the same model.
        let mut canonical = String::new();
        for vm in loaded.desired.vms.values() {
            let mut config = (*vm.config).clone();
            config.canonicalize();
            let doc = VmDocument {
                api_version: API_VERSION.into(),
                kind: KIND.into(),
                metadata: Metadata {
                    name: vm.name.clone(),
                    labels: Default::default(),
                },
                spec: config,
                status: None,
            };
            canonical.push_str("---\n");
            canonical.push_str(&serde_yaml::to_string(&doc).expect("a loaded spec renders"));
        }
        let (again, _, _) = load(&canonical);
        assert!(
            again.errors.is_empty(),
            "the canonical rendering does not load: {:?}\n{canonical}",
            again.errors
        );
        let canon = |l: &Loaded| {
            l.desired
                .vms
                .iter()
                .map(|(n, v)| {
                    let mut c = (*v.config).clone();
                    c.canonicalize();
                    (n.clone(), c)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            canon(&loaded),
            canon(&again),
            "round trip changed the model"
        );
    }
}
