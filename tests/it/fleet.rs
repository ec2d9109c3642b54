//! Issue 17: a fleet from one repository. Ten hosts, each in a network
//! namespace this test makes, each with its own state directory and a
//! watcher on the simulator virtstack, follow one repository that git's own
//! server (`git daemon`) serves on the test's namespaces (10.231.0.0/24,
//! on a bridge in a namespace of its own: no other address is used). 1,000
//! specs are spread across the hosts by label (`host: hN`) and directory.
//!
//! Then (issue 35) the watchers run again in three rollout waves (h0; h1-h3;
//! h4-h9) gated by a real Prometheus (Debian's `prometheus`) that the test
//! starts in the server's namespace, scraping every host: a good
//! restart-class revision goes wave by wave, a bad one is reverted on wave 1
//! and goes no further, and with Prometheus stopped no later wave moves.
//!
//! Needs root (namespaces), `ip`, `git`, `ssh-keygen` and `prometheus`. With
//! `UVMCTL_FLEET_REPORT=1` it prints its timings and each watcher's idle
//! RSS and CPU (scripts/bench-fleet); it asserts none of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOSTS: usize = 10;
const VMS: usize = 1000;
const SUBNET: &str = "10.231.0";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The namespaces, the git server and the watchers; all gone when dropped.
struct Fleet {
    dir: tempfile::TempDir,
    tag: String,
    daemon: Option<Child>,
    watchers: Vec<Child>,
    key: PathBuf,
    prometheus: Option<Child>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for w in &mut self.watchers {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.stop_prometheus();
        if let Some(d) = &mut self.daemon {
            let _ = d.kill();
            let _ = d.wait();
        }
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

impl Fleet {
    fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.server_ns()];
        all.extend((0..HOSTS).map(|i| self.host_ns(i)));
        all
    }

    fn server_ns(&self) -> String {
        format!("uvf{}s", self.tag)
    }

    fn host_ns(&self, i: usize) -> String {
        format!("uvf{}h{i}", self.tag)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A bridge in the server's namespace, a veth from it to each host.
    fn network(&self) {
        let srv = self.server_ns();
        for ns in self.namespaces() {
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &srv, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SUBNET}.1/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &srv, "link", "set", "br0", "up"]);
        for i in 0..HOSTS {
            let host = self.host_ns(i);
            let (a, b) = (
                format!("uvf{}a{i}", self.tag),
                format!("uvf{}b{i}", self.tag),
            );
            ip(&[
                "link", "add", &a, "netns", &srv, "type", "veth", "peer", "name", &b, "netns",
                &host,
            ]);
            ip(&["-n", &srv, "link", "set", &a, "master", "br0", "up"]);
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("{SUBNET}.{}/24", 10 + i),
                "dev",
                &b,
            ]);
            ip(&["-n", &host, "link", "set", &b, "up"]);
        }
    }

    fn git(&self, args: &[&str]) -> String {
        run(Command::new("git")
            .arg("-C")
            .arg(self.path("work"))
            .args([
                "-c",
                "user.name=fleet",
                "-c",
                "user.email=fleet@example.com",
            ])
            .args(args))
    }

    /// Commits the work tree (signed unless `unsigned`) and pushes it to
    /// the served repository; the new commit.
    fn commit(&self, message: &str, signed: bool) -> String {
        self.git(&["add", "-A"]);
        let key = format!("user.signingkey={}", self.key.display());
        let mut args = vec![
            "-c",
            "gpg.format=ssh",
            "-c",
            key.as_str(),
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            message,
        ];
        if signed {
            args.push("-S");
        }
        self.git(&args);
        self.git(&["push", "-q", "origin", "HEAD:main"]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn spec_path(&self, host: usize, vm: usize) -> PathBuf {
        self.path(&format!("work/hosts/h{host}/vm-{vm:04}.yaml"))
    }

    fn write_vm(&self, host: usize, vm: usize, memory: u32) {
        let p = self.spec_path(host, vm);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(
            p,
            format!(
                "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: vm-{vm:04}\n  labels:\n    host: h{host}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /var/lib/uvmctl/images/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: {memory}\n"
            ),
        )
        .expect("write spec");
    }

    fn watch(&mut self, i: usize) {
        self.watch_with(i, &[]);
    }

    fn watch_with(&mut self, i: usize, extra: &[String]) {
        let state = self.path(&format!("h{i}/state"));
        let cache = self.path(&format!("h{i}/git"));
        // Appended to: a watcher started again keeps the first one's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("h{i}.log")))
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host_ns(i)])
            .arg(env!("CARGO_BIN_EXE_uvmctl"))
            .args(["--virtstack", "sim", "--state-dir"])
            .arg(&state)
            .args([
                "watch",
                "--git",
                &format!("git://{SUBNET}.1/fleet.git"),
                "--git-cache",
            ])
            .arg(&cache)
            .args([
                "--git-path",
                "hosts",
                "--for-host",
                &format!("h{i}"),
                "--prune",
            ])
            .arg("--allowed-signers")
            .arg(self.path("keys/allowed_signers"))
            .args([
                "--git-interval",
                "1s",
                "--resync",
                "1h",
                "--log-format",
                "json",
            ])
            .args(["--metrics-listen", &format!("{SUBNET}.{}:9464", 10 + i)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("watch runs");
        self.watchers.push(child);
    }

    /// What host `i`'s cache says is in force, and why the last attempt failed.
    fn source(&self, i: usize) -> (Option<String>, Option<String>, u64) {
        let Ok(text) = std::fs::read_to_string(self.path(&format!("h{i}/git/source.json"))) else {
            return (None, None, 0);
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        (
            v["applied"]["sha"].as_str().map(String::from),
            v["lastErrorKind"].as_str().map(String::from),
            v["refusedUnverified"].as_u64().unwrap_or(0),
        )
    }

    /// Host `i`'s watcher status file.
    fn watch_status(&self, i: usize) -> serde_json::Value {
        std::fs::read_to_string(self.path(&format!("h{i}/state/watch-status.json")))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Host `i`'s VMs and their memory, from the simulator's records.
    fn vms(&self, i: usize) -> BTreeMap<String, u64> {
        let out = Command::new(env!("CARGO_BIN_EXE_uvmctl"))
            .args(["--virtstack", "sim", "--state-dir"])
            .arg(self.path(&format!("h{i}/state")))
            .args(["status", "--output", "json"])
            .output()
            .expect("status runs");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        doc["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "running")
            .filter_map(|r| Some((r["name"].as_str()?.to_string(), r["memoryMb"].as_u64()?)))
            .collect()
    }

    /// Operations host `i` applied so far, from its metrics (scraped from
    /// inside its namespace and read by Python's prometheus_client).
    fn metrics(&self, i: usize) -> serde_json::Value {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.host_ns(i), "python3"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metrics/scrape.py"))
            .arg(format!("http://{SUBNET}.{}:9464/metrics", 10 + i)));
        serde_json::from_str(&out).expect("json")
    }

    fn applied(&self, i: usize) -> f64 {
        let m = self.metrics(i);
        m["families"]["uvmctl_reconciles"]["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s[1]["result"] == "applied" || s[1]["result"] == "pruned")
            .filter_map(|s| s[2].as_f64())
            .sum()
    }

    fn log_tail(&self, i: usize, n: usize) -> String {
        let text = std::fs::read_to_string(self.path(&format!("h{i}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn all_applied(&self) -> Vec<f64> {
        (0..HOSTS).map(|i| self.applied(i)).collect()
    }

    /// Waits (at most 120 s) until `ok` holds on every host; how long it took.
    fn converge(&self, what: &str, ok: &dyn Fn(usize) -> bool) -> Duration {
        let start = Instant::now();
        let took = self.converge_inner(what, ok, start);
        if std::env::var_os("UVMCTL_FLEET_REPORT").is_some() {
            eprintln!("fleet: {what}: {:.2} s", took.as_secs_f64());
        }
        took
    }

    fn converge_inner(&self, what: &str, ok: &dyn Fn(usize) -> bool, start: Instant) -> Duration {
        let mut pending: Vec<usize> = (0..HOSTS).collect();
        while !pending.is_empty() {
            pending.retain(|i| !ok(*i));
            if pending.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{what}: hosts {pending:?} did not converge in 120 s; host {} log:\n{}",
                pending[0],
                std::fs::read_to_string(self.path(&format!("h{}.log", pending[0])))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    }
}

/// The rollout part: Prometheus, the waves and what the hosts publish.
impl Fleet {
    /// Starts (or starts again, on the same storage) Prometheus in the
    /// server's namespace, scraping every host's watcher each second, and
    /// waits until it is ready.
    fn start_prometheus(&mut self) {
        let config = self.path("prometheus.yml");
        let targets: Vec<String> = (0..HOSTS)
            .map(|i| format!("'{SUBNET}.{}:9464'", 10 + i))
            .collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: uvmctl\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("prometheus.yml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("prometheus.log"))
            .expect("log");
        self.prometheus = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.server_ns(), "prometheus"])
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    self.path("prometheus-data").display()
                ))
                .arg(format!("--web.listen-address={SUBNET}.1:9090"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("prometheus runs (Debian's prometheus package)"),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.prometheus_ready() {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready in 60 s:\n{}",
                std::fs::read_to_string(self.path("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop_prometheus(&mut self) {
        if let Some(p) = &mut self.prometheus {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.prometheus = None;
    }

    fn prometheus_ready(&self) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.server_ns(), "python3", "-c"])
            .arg("import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)")
            .arg(format!("http://{SUBNET}.1:9090/-/ready"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A VM of the rollout part: `cpus` processors, judged by an agent
    /// probe (which the simulator fails while `uvmctl.sim.unhealthy` is on
    /// the command line), recreated when it must be.
    fn write_judged_vm(&self, host: usize, vm: usize, memory: u64, cpus: u32, unhealthy: bool) {
        let p = self.spec_path(host, vm);
        let cmdline = if unhealthy {
            "\n      cmdline: console=ttyS0 uvmctl.sim.unhealthy"
        } else {
            ""
        };
        std::fs::write(
            p,
            format!(
                "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: vm-{vm:04}\n  labels:\n    host: h{host}\nspec:\n  policy:\n    allowRecreate: true\n  health:\n    probes:\n      - kind: agent\n        intervalSeconds: 1\n        minHealthySeconds: 0\n        deadlineSeconds: 5\n  boot:\n    linuxKernelDirect:\n      kernel: /var/lib/uvmctl/images/vmlinuz{cmdline}\n  processors:\n    count: {cpus}\n  memory:\n    sizeMB: {memory}\n"
            ),
        )
        .expect("write spec");
    }

    /// Host `i`'s rollout series: (revision, unix time) of the revision in
    /// force and of since when it is settled and healthy, from its metrics.
    fn rollout(&self, i: usize) -> (Option<Stamp>, Option<Stamp>) {
        let m = self.metrics(i);
        let one = |family: &str| {
            m["families"][family]["samples"]
                .as_array()
                .and_then(|s| s.first())
                .and_then(|s| Some((s[1]["revision"].as_str()?.to_string(), s[2].as_f64()?)))
        };
        (
            one("uvmctl_rollout_in_force_timestamp_seconds"),
            one("uvmctl_rollout_healthy_since_timestamp_seconds"),
        )
    }

    fn reverts(&self, i: usize) -> f64 {
        let m = self.metrics(i);
        m["families"]["uvmctl_reverts"]["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[2].as_f64())
            .sum()
    }

    /// What host `i`'s source says of its gate: (open, revision asked
    /// about, answer, when asked).
    fn gate(&self, i: usize) -> Option<(bool, String, String, u64)> {
        let text = std::fs::read_to_string(self.path(&format!("h{i}/git/source.json"))).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let g = &v["gate"];
        Some((
            g["open"].as_bool()?,
            g["revision"]["sha"].as_str()?.to_string(),
            g["answer"].as_str()?.to_string(),
            g["checkedAt"].as_u64()?,
        ))
    }
}

/// A revision and a Unix time.
type Stamp = (String, f64);

fn wave_of(host: usize) -> u32 {
    match host {
        0 => 1,
        1..=3 => 2,
        _ => 3,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const SOAK_SECONDS: u64 = 2;

/// The rollout part of the fleet test (issue 35).
fn rollout_waves(f: &mut Fleet, memory: &[u64], report: bool) {
    for mut w in std::mem::take(&mut f.watchers) {
        let _ = w.kill();
        let _ = w.wait();
    }
    f.start_prometheus();
    for i in 0..HOSTS {
        let extra: Vec<String> = [
            "--wave".to_string(),
            wave_of(i).to_string(),
            "--prometheus".into(),
            format!("http://{SUBNET}.1:9090"),
            "--soak".into(),
            format!("{SOAK_SECONDS}s"),
            "--max-disruption".into(),
            "recreate".into(),
        ]
        .into();
        f.watch_with(i, &extra);
    }
    let hosts_of =
        |wave: u32| -> Vec<usize> { (0..HOSTS).filter(|i| wave_of(*i) == wave).collect() };
    let in_force = f.source(0).0.expect("a revision in force");
    f.converge("the waves' watchers settled", &|i| {
        f.watch_status(i)["rollout"]["healthySince"].is_u64()
            && f.source(i).0.as_deref() == Some(in_force.as_str())
    });

    // Ten VMs a host, none moved earlier: restart-class (processors) and
    // judged from now on.
    let judged: Vec<usize> = (20..VMS).filter(|vm| vm / HOSTS < 12).collect();
    assert_eq!(judged.len(), 100);
    for vm in &judged {
        f.write_judged_vm(host_of(*vm), *vm, memory[*vm], 2, false);
    }
    let before = f.all_applied();
    let pushed_at = unix_now();
    let good = f.commit("100 VMs: two processors, judged", true);
    let revision = format!("main@sha1:{good}");
    let took = f.converge("the good revision in every wave", &|i| {
        let status = f.watch_status(i);
        f.source(i).0.as_deref() == Some(good.as_str())
            && judged.iter().filter(|vm| host_of(**vm) == i).all(|vm| {
                let w = &status["vms"][format!("vm-{vm:04}")];
                w["revision"] == revision.as_str() && w["health"]["health"] == "healthy"
            })
            && f.rollout(i).1.is_some_and(|(r, _)| r == good)
    });
    // In order, from the hosts' own metrics: each wave in force only after
    // every host of the one before had it settled and healthy for the soak.
    let series: Vec<_> = (0..HOSTS).map(|i| f.rollout(i)).collect();
    let at = |i: usize| -> (f64, f64) {
        let (Some((r1, forced)), Some((r2, healthy))) = &series[i] else {
            panic!("h{i} publishes its rollout: {:?}", series[i]);
        };
        assert_eq!((r1, r2), (&good, &good), "h{i}");
        (*forced, *healthy)
    };
    let mut lines = Vec::new();
    for wave in 2..=3u32 {
        let before_healthy = hosts_of(wave - 1)
            .into_iter()
            .map(|i| at(i).1)
            .fold(0.0, f64::max);
        let first = hosts_of(wave)
            .into_iter()
            .map(|i| at(i).0)
            .fold(f64::MAX, f64::min);
        assert!(
            first >= before_healthy + SOAK_SECONDS as f64,
            "wave {wave} in force at {first}, before wave {} was healthy ({before_healthy}) for {SOAK_SECONDS} s",
            wave - 1
        );
    }
    for wave in 1..=3u32 {
        let last = hosts_of(wave)
            .into_iter()
            .map(|i| at(i).0)
            .fold(0.0, f64::max);
        lines.push(format!(
            "fleet: waves: wave {wave} in force {:.0} s after the push",
            last - pushed_at as f64
        ));
    }
    let after = f.all_applied();
    for i in 0..HOSTS {
        // Each changed VM applied, and its verdict written (a reconcile).
        let ops = after[i] - before[i];
        assert!(ops >= 10.0, "h{i} applied {ops}: {}", f.log_tail(i, 20));
    }
    if report {
        let interval = 1.0;
        let floor = 3.0 * (SOAK_SECONDS as f64 + interval);
        lines.push(format!(
            "fleet: waves: push to every wave in force (3 waves, soak {SOAK_SECONDS} s, fetch interval 1 s): {:.2} s; floor waves x (S + I) = {floor:.0} s; {:.2} s a wave over it",
            took.as_secs_f64(),
            (took.as_secs_f64() - floor) / 3.0
        ));
        for l in &lines {
            println!("{l}");
        }
    }

    // A revision that leaves wave 1's guests unhealthy: reverted there, and
    // no later wave performs any operation.
    for vm in &judged {
        f.write_judged_vm(host_of(*vm), *vm, memory[*vm], 2, true);
    }
    let before = f.all_applied();
    let bad = f.commit("the guests made unhealthy", true);
    f.converge("wave 1 reverted the bad revision", &|i| {
        i != 0 || (f.source(0).0.as_deref() == Some(bad.as_str()) && f.reverts(0) == 10.0)
    });
    let reverted_at = unix_now();
    for vm in judged.iter().filter(|vm| host_of(**vm) == 0) {
        let w = &f.watch_status(0)["vms"][format!("vm-{vm:04}")];
        assert_eq!(w["revert"]["state"], "reverted", "vm-{vm:04}: {w}");
    }
    // Later waves keep asking, and keep being told no.
    f.converge("the later waves asked again, and waited", &|i| {
        i == 0
            || f.gate(i).is_some_and(|(open, asked, _, when)| {
                !open && asked == bad && when > reverted_at + SOAK_SECONDS + 1
            })
    });
    let after = f.all_applied();
    for i in 1..HOSTS {
        assert_eq!(
            after[i] - before[i],
            0.0,
            "h{i} (wave {}) performed operations: {}",
            wave_of(i),
            f.log_tail(i, 20)
        );
        assert_eq!(
            f.source(i).0.as_deref(),
            Some(good.as_str()),
            "h{i} kept the good revision"
        );
    }

    // With Prometheus gone, a fix reaches wave 1 and no further, and each
    // host says why; back, and the fix goes on.
    f.stop_prometheus();
    for vm in &judged {
        f.write_judged_vm(host_of(*vm), *vm, memory[*vm], 2, false);
    }
    let fix = f.commit("the guests healthy again", true);
    f.converge("the fix settled on wave 1", &|i| {
        i != 0
            || f.watch_status(0)["rollout"]["healthySince"].is_u64()
                && f.watch_status(0)["rollout"]["revision"] == fix.as_str()
    });
    let settled_at = unix_now();
    f.converge("the later waves told Prometheus is unreachable", &|i| {
        i == 0
            || f.gate(i).is_some_and(|(open, asked, answer, when)| {
                !open
                    && asked == fix
                    && answer.contains("unreachable")
                    && when > settled_at + SOAK_SECONDS + 1
            })
    });
    for i in 1..HOSTS {
        assert_eq!(
            f.source(i).0.as_deref(),
            Some(good.as_str()),
            "h{i} did not advance"
        );
    }
    let out = run(Command::new(env!("CARGO_BIN_EXE_uvmctl"))
        .args(["--virtstack", "sim", "--state-dir"])
        .arg(f.path("h4/state"))
        .arg("status"));
    assert!(
        out.contains(&format!(
            "gate of wave 2: closed, waiting to put in force main@sha1:{fix}"
        )) && out.contains("unreachable"),
        "status says why:\n{out}"
    );
    let before = f.all_applied();
    f.start_prometheus();
    f.converge("the fix in every wave", &|i| {
        f.source(i).0.as_deref() == Some(fix.as_str())
            && f.watch_status(i)["rollout"]["healthySince"].is_u64()
    });
    let after = f.all_applied();
    for i in 1..HOSTS {
        // What they run already is what the fix says.
        assert_eq!(after[i] - before[i], 0.0, "h{i}: {}", f.log_tail(i, 20));
    }
}

fn host_of(vm: usize) -> usize {
    vm % HOSTS
}

#[test]
fn a_fleet_of_ten_hosts_follows_one_repository() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the fleet test makes network namespaces: run it as root (scripts/test does)"
    );
    let report = std::env::var_os("UVMCTL_FLEET_REPORT").is_some();
    let mut f = Fleet {
        dir: tempfile::Builder::new()
            .prefix("uvf")
            .tempdir_in("/tmp")
            .expect("tempdir"),
        tag: format!("{:x}", std::process::id() & 0xffff),
        daemon: None,
        watchers: Vec::new(),
        key: PathBuf::new(),
        prometheus: None,
    };
    f.network();

    // A signing key, the only allowed signer.
    std::fs::create_dir_all(f.path("keys")).expect("mkdir");
    f.key = f.path("keys/id");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "fleet", "-f"])
        .arg(&f.key));
    let public = std::fs::read_to_string(f.key.with_extension("pub")).expect("public key");
    std::fs::write(
        f.path("keys/allowed_signers"),
        format!("fleet@example.com {public}"),
    )
    .expect("allowed signers");

    // The served repository, and a work tree pushing to it.
    run(Command::new("git")
        .args(["init", "-q", "--bare", "-b", "main"])
        .arg(f.path("srv/fleet.git")));
    run(Command::new("git")
        .args(["init", "-q", "-b", "main"])
        .arg(f.path("work")));
    f.git(&[
        "remote",
        "add",
        "origin",
        f.path("srv/fleet.git").to_str().expect("utf-8"),
    ]);
    for vm in 0..VMS {
        f.write_vm(host_of(vm), vm, 64);
    }
    let first = f.commit("1,000 VMs", true);
    f.daemon = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &f.server_ns(),
                "git",
                "daemon",
                "--reuseaddr",
                "--export-all",
            ])
            .arg(format!("--base-path={}", f.path("srv").display()))
            .args([
                &format!("--listen={SUBNET}.1"),
                "--port=9418",
                "--max-connections=64",
            ])
            .arg(f.path("srv"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon runs"),
    );
    let started = Instant::now();
    for i in 0..HOSTS {
        f.watch(i);
    }
    let per_host = VMS / HOSTS;
    let took = f.converge("the first revision", &|i| {
        f.source(i).0.as_deref() == Some(first.as_str())
            && f.vms(i).len() == per_host
            && f.applied(i) as usize == per_host
    });
    let mut timings = vec![("1,000 VMs created".to_string(), started.elapsed().max(took))];
    let m = f.metrics(0);
    let revisions = &m["families"]["uvmctl_source_revision"]["samples"];
    assert!(
        revisions
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s[1]["kind"] == "applied"
                && s[1]["revision"] == format!("main@sha1:{first}").as_str()
                && s[2] == 1.0)),
        "the revision in force in the metrics: {revisions}"
    );

    // 1%, 10%, 100% of the VMs change; hosts with no changed VM do nothing.
    let mut memory = vec![64u64; VMS];
    for (share, count, hosts) in [("1%", 10, 2), ("10%", 100, 5), ("100%", 1000, HOSTS)] {
        let changed: Vec<usize> = (0..VMS)
            .filter(|vm| host_of(*vm) < hosts)
            .take(count)
            .collect();
        for vm in &changed {
            memory[*vm] += 32;
            f.write_vm(
                host_of(*vm),
                *vm,
                u32::try_from(memory[*vm]).expect("small"),
            );
        }
        let before = f.all_applied();
        let pushed = Instant::now();
        let sha = f.commit(&format!("{share} of the VMs"), true);
        let revision = format!("main@sha1:{sha}");
        f.converge(share, &|i| {
            // Every changed VM of the host reconciled at the new revision
            // (its metrics are counted by then), and has what it says.
            let status = f.watch_status(i);
            f.source(i).0.as_deref() == Some(sha.as_str())
                && changed.iter().filter(|vm| host_of(**vm) == i).all(|vm| {
                    let w = &status["vms"][format!("vm-{vm:04}")];
                    w["revision"] == revision.as_str()
                        && w["result"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("applied"))
                })
                && f.vms(i).iter().all(|(name, mb)| {
                    let vm: usize = name.trim_start_matches("vm-").parse().expect("vm number");
                    memory[vm] == *mb
                })
        });
        timings.push((format!("{share} commit converged"), pushed.elapsed()));
        let after = f.all_applied();
        for i in 0..HOSTS {
            let ops = after[i] - before[i];
            let expected = changed.iter().filter(|vm| host_of(**vm) == i).count();
            assert_eq!(
                ops as usize,
                expected,
                "{share}: host h{i} applied {ops} reconcile(s); its log ends:\n{}",
                f.log_tail(i, 40)
            );
        }
    }

    // A commit that breaks one host's spec file is put in force nowhere.
    let broken = f.spec_path(3, 3);
    let good_text = std::fs::read_to_string(&broken).expect("spec");
    std::fs::write(&broken, "apiVersion: [\n").expect("break");
    let in_force = f.source(0).0;
    let before = f.all_applied();
    f.commit("broken spec on h3", true);
    f.converge("the broken revision refused", &|i| {
        f.source(i).1.as_deref() == Some("spec-errors")
    });
    for i in 0..HOSTS {
        assert_eq!(f.source(i).0, in_force, "h{i} kept the revision in force");
    }
    assert!(
        std::fs::read_to_string(f.path("h3.log"))
            .expect("log")
            .contains("hosts/h3/vm-0003.yaml"),
        "h3 names its broken file"
    );
    std::fs::write(&broken, good_text).expect("fix");
    let fixed = f.commit("fixed", true);
    f.converge("the fix", &|i| {
        f.source(i).0.as_deref() == Some(fixed.as_str())
    });
    assert_eq!(f.all_applied(), before, "nothing changed anywhere");

    // Unsigned: refused by every host; signed on top: applied.
    memory[5] += 32;
    f.write_vm(host_of(5), 5, u32::try_from(memory[5]).expect("small"));
    f.commit("unsigned", false);
    f.converge("the unsigned commit refused", &|i| {
        f.source(i).1.as_deref() == Some("unverified") && f.source(i).2 == 1
    });
    let m = f.metrics(7);
    assert_eq!(
        m["families"]["uvmctl_source_unverified_revisions"]["samples"][0][2], 1.0,
        "counted once in the metrics"
    );
    // Issue 30: every kind of refusal has its count, not only this one.
    let refused = &m["families"]["uvmctl_source_refused_revisions"]["samples"];
    assert!(
        refused.as_array().is_some_and(|s| s
            .iter()
            .any(|s| s[1]["kind"] == "unverified" && s[2] == 1.0)),
        "{refused}"
    );
    assert!((0..HOSTS).all(|i| f.source(i).0.as_deref() == Some(fixed.as_str())));
    assert_eq!(f.vms(host_of(5))["vm-0005"], memory[5] - 32, "not applied");
    let signed = f.commit("signed", true);
    f.converge("the signed commit", &|i| {
        f.source(i).0.as_deref() == Some(signed.as_str())
            && (i != host_of(5) || f.vms(i)["vm-0005"] == memory[5])
    });

    // A VM moved from h0 to h1: pruned on h0, created on h1.
    let from = f.spec_path(0, 10);
    std::fs::remove_file(&from).expect("rm");
    f.write_vm(1, 10, u32::try_from(memory[10]).expect("small"));
    let pushed = Instant::now();
    let moved = f.commit("vm-0010 to h1", true);
    f.converge("the move", &|i| {
        f.source(i).0.as_deref() == Some(moved.as_str())
            && match i {
                0 => !f.vms(0).contains_key("vm-0010"),
                1 => f.vms(1).contains_key("vm-0010"),
                _ => true,
            }
    });
    timings.push(("a VM moved between hosts".into(), pushed.elapsed()));

    if report {
        // Fetch to applied on one host (SIGHUP: fetch now), next to the
        // same edit in a plain directory followed by a watcher of its own.
        memory[0] += 32;
        f.write_vm(0, 0, u32::try_from(memory[0]).expect("small"));
        f.commit("one VM, for the latency", true);
        let pushed = Instant::now();
        run(Command::new("kill").args(["-HUP", &f.watchers[0].id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.vms(0).get("vm-0000") != Some(&memory[0]) {
            assert!(Instant::now() < deadline, "the git edit applied");
            std::thread::sleep(Duration::from_millis(10));
        }
        timings.push((
            "one edit, push to applied (git, SIGHUP)".into(),
            pushed.elapsed(),
        ));
        let plain = f.path("plain");
        std::fs::create_dir_all(&plain).expect("mkdir");
        for e in std::fs::read_dir(f.path("work/hosts/h0")).expect("h0's specs") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), plain.join(e.file_name())).expect("copy");
        }
        let state = f.path("plain-state");
        let mut w = Command::new(env!("CARGO_BIN_EXE_uvmctl"))
            .args(["--virtstack", "sim", "--state-dir"])
            .arg(&state)
            .arg("watch")
            .arg(&plain)
            .args(["--resync", "1h"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watch runs");
        let memory_of = |vm: &str| -> Option<u64> {
            let out = Command::new(env!("CARGO_BIN_EXE_uvmctl"))
                .args(["--virtstack", "sim", "--state-dir"])
                .arg(&state)
                .args(["status", "--output", "json"])
                .output()
                .ok()?;
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            doc["vms"].as_array()?.iter().find(|r| r["name"] == vm)?["memoryMb"].as_u64()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while memory_of("vm-0000") != Some(memory[0]) {
            assert!(Instant::now() < deadline, "the plain watcher started");
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(plain.join("vm-0000.yaml")).expect("spec");
        let edited = text.replace(
            &format!("sizeMB: {}", memory[0]),
            &format!("sizeMB: {}", memory[0] + 32),
        );
        let saved = Instant::now();
        std::fs::write(plain.join("vm-0000.yaml"), edited).expect("edit");
        while memory_of("vm-0000") != Some(memory[0] + 32) {
            assert!(Instant::now() < deadline, "the plain edit applied");
            std::thread::sleep(Duration::from_millis(10));
        }
        timings.push((
            "one edit, save to applied (plain directory)".into(),
            saved.elapsed(),
        ));
        let _ = w.kill();
        let _ = w.wait();
        for (what, took) in &timings {
            println!("fleet: {what}: {:.2} s", took.as_secs_f64());
        }
        let ticks = |pid: u32| -> u64 {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
                    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
                })
                .unwrap_or(0)
        };
        // The watcher is the child of `ip netns exec`, which execs it.
        let pids: Vec<u32> = f.watchers.iter().map(Child::id).collect();
        let before: Vec<u64> = pids.iter().map(|p| ticks(*p)).collect();
        let idle = Duration::from_secs(10);
        std::thread::sleep(idle);
        for (i, pid) in pids.iter().enumerate() {
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .map(String::from)
                })
                .unwrap_or_default();
            let cpu = (ticks(*pid) - before[i]) as f64 / 100.0 / idle.as_secs_f64() * 100.0;
            println!(
                "fleet: h{i} idle (1 s fetch interval): {} CPU {cpu:.2} %",
                rss.trim()
            );
        }
    }
    rollout_waves(&mut f, &memory, report);
}
