//! Rendering a plan: text for people (Terraform's symbols), a versioned JSON
//! document for machines, and a unified diff of canonical YAML.

use super::{Op, PLAN_FORMAT_VERSION, Plan, Summary, VmAction, VmPlan, observed_power};
use crate::spec::{SpecError, VmConfig};
use crate::vm::ObservedState;
use crate::vm::items::{Item, describe};
use crate::vm::{Disruption, ResourceOperation};
use serde::Serialize;
use std::fmt::Write;

/// Whether to color text output (only ever on a terminal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Emit ANSI colors.
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
    fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    fn magenta(&self, s: &str) -> String {
        self.paint("35", s)
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
}

fn symbol(style: &Style, op: ResourceOperation) -> String {
    match op {
        ResourceOperation::Add => style.green("+"),
        ResourceOperation::Remove => style.red("-"),
        ResourceOperation::Update => style.yellow("~"),
    }
}

fn class(style: &Style, d: Disruption) -> String {
    let word = format!("[{d}]");
    match d {
        Disruption::Live => style.dim(&word),
        Disruption::Restart => style.yellow(&word),
        Disruption::Recreate => style.magenta(&word),
        Disruption::Unsupported => style.red(&word),
    }
}

/// What changed between two items, as `field: old → new` pairs (nested
/// fields by their dotted path, so a boot change reads
/// `linuxKernelDirect.cmdline: a → b`, never two JSON blobs); the whole
/// description when they are not structs.
fn change_detail(before: &Item, after: &Item) -> String {
    let (b, a) = match (serde_json::to_value(before), serde_json::to_value(after)) {
        (Ok(b), Ok(a)) => (b, a),
        _ => return format!("{} → {}", describe(before), describe(after)),
    };
    if !(b.is_object() && a.is_object()) {
        return format!("{} → {}", describe(before), describe(after));
    }
    let mut parts = Vec::new();
    changed_fields("", Some(&b), Some(&a), &mut parts);
    parts.join(", ")
}

/// `path: old → new` for every leaf that differs; an object on one side
/// only (a boot kind switched) is compared field by field with nothing.
fn changed_fields(
    path: &str,
    b: Option<&serde_json::Value>,
    a: Option<&serde_json::Value>,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    let object = |v: Option<&Value>| match v {
        Some(Value::Object(o)) => Some(o.clone()),
        None | Some(Value::Null) => Some(serde_json::Map::new()),
        Some(_) => None,
    };
    let nested = matches!(b, Some(Value::Object(_))) || matches!(a, Some(Value::Object(_)));
    if let (true, Some(bo), Some(ao)) = (nested, object(b), object(a)) {
        let mut keys: Vec<&String> = bo.keys().chain(ao.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let sub = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            changed_fields(&sub, bo.get(k), ao.get(k), out);
        }
    } else if b != a && !(is_none(b) && is_none(a)) {
        out.push(format!("{path}: {} → {}", short(b), short(a)));
    }
}

fn is_none(v: Option<&serde_json::Value>) -> bool {
    matches!(v, None | Some(serde_json::Value::Null))
}

fn short(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => "none".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn op_line(style: &Style, op: &Op, creating: bool) -> String {
    let key = op.key.to_string();
    let name = if key.is_empty() {
        op.resource.to_string()
    } else {
        format!("{} {key}", op.resource)
    };
    let detail = match (&op.before, &op.after) {
        (Some(b), Some(a)) => change_detail(b, a),
        (None, Some(a)) => describe(a),
        (Some(b), None) => describe(b),
        (None, None) => String::new(),
    };
    let mut line = format!("    {} {}: {}", symbol(style, op.operation), name, detail);
    // Everything of a VM being built is live; only exceptions are worth a tag.
    if !(creating && op.disruption == Disruption::Live) {
        let _ = write!(line, " {}", class(style, op.disruption));
    }
    if !op.reason.is_empty() {
        let _ = write!(line, " {}", style.dim(&format!("# {}", op.reason)));
    }
    line
}

fn vm_header(style: &Style, vm: &VmPlan) -> String {
    let name = style.bold(&vm.name);
    match vm.action {
        VmAction::Create => format!(
            "  {} vm {name} will be created {}",
            style.green("+"),
            class(style, vm.disruption)
        ),
        VmAction::Destroy => format!(
            "  {} vm {name} will be destroyed (pruned) {}",
            style.red("-"),
            class(style, vm.disruption)
        ),
        VmAction::Update => format!(
            "  {} vm {name} will be updated {}",
            style.yellow("~"),
            class(style, vm.disruption)
        ),
        VmAction::Recreate => {
            let allowed = match vm.recreate_allowed {
                Some(true) => "allowed by spec.policy.allowRecreate",
                _ => "apply needs --allow-recreate or spec.policy.allowRecreate",
            };
            format!(
                "{} vm {name} must be recreated {} ({allowed})",
                style.magenta("-/+"),
                class(style, vm.disruption)
            )
        }
    }
}

/// The summary line: `Plan: 3 to add, 1 to change, 0 to remove, 1 VM to recreate; max disruption: restart`.
pub fn summary_line(s: &Summary) -> String {
    let vms = if s.recreate == 1 { "VM" } else { "VMs" };
    let mut line = format!(
        "Plan: {} to add, {} to change, {} to remove, {} {vms} to recreate",
        s.add, s.change, s.remove, s.recreate
    );
    if let Some(d) = s.max_disruption {
        let _ = write!(line, "; max disruption: {d}");
    }
    line
}

/// Human text, like Terraform's plan output.
pub fn text(plan: &Plan, style: &Style) -> String {
    let mut out = String::new();
    if plan.has_changes() {
        let _ = writeln!(
            out,
            "uvmctl will perform these actions on virtstack {}:\n",
            plan.virtstack
        );
        for vm in &plan.vms {
            let _ = writeln!(out, "{}", vm_header(style, vm));
            for op in &vm.ops {
                let _ = writeln!(out, "{}", op_line(style, op, vm.action == VmAction::Create));
            }
            out.push('\n');
        }
    }
    if !plan.notes.is_empty() {
        let _ = writeln!(out, "Left alone:");
        for n in &plan.notes {
            let _ = writeln!(
                out,
                "  {} vm {}: {}",
                style.yellow("!"),
                style.bold(&n.vm),
                n.message
            );
        }
        out.push('\n');
    }
    if plan.has_changes() {
        let _ = writeln!(out, "{}", style.bold(&summary_line(&plan.summary())));
    } else {
        let vms = if plan.unchanged == 1 {
            "VM matches its spec"
        } else {
            "VMs match their specs"
        };
        let _ = writeln!(out, "No changes. {} {vms}.", plan.unchanged);
    }
    out
}

/// The JSON plan document, version [`PLAN_FORMAT_VERSION`]; described in `docs/plan-json.md`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonPlan<'a> {
    format_version: u32,
    virtstack: &'a str,
    summary: Summary,
    vms: &'a [VmPlan],
    notes: &'a [super::Note],
    unchanged: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    prune_refused: Option<&'a super::prune::PruneRefusal>,
    errors: &'a [SpecError],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    refused: &'a [super::Refused],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    held: &'a [Held],
}

/// A VM the maintenance windows hold (`plan --output json`'s `held`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    /// The VM.
    pub vm: String,
    /// Why, as plan says it.
    pub message: String,
    /// When its window opens next (RFC 3339, UTC); absent: never, or the
    /// policy does not load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<String>,
}

/// The plan as a JSON document, with the spec errors of the run and the
/// VMs apply's pre-flight would refuse.
pub fn json(plan: &Plan, errors: &[SpecError], refused: &[super::Refused]) -> String {
    json_held(plan, errors, refused, &[])
}

/// [`json`], with the VMs the maintenance windows hold.
pub fn json_held(
    plan: &Plan,
    errors: &[SpecError],
    refused: &[super::Refused],
    held: &[Held],
) -> String {
    let doc = JsonPlan {
        format_version: PLAN_FORMAT_VERSION,
        virtstack: &plan.virtstack,
        summary: plan.summary(),
        vms: &plan.vms,
        notes: &plan.notes,
        unchanged: plan.unchanged,
        prune_refused: plan.prune_refused.as_ref(),
        errors,
        refused,
        held,
    };
    // Serializing plain data to a String cannot fail.
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Canonical YAML of a VM: lists sorted by key, defaults omitted.
pub fn canonical_yaml(config: &VmConfig) -> String {
    let mut c = config.clone();
    c.canonicalize();
    serde_yaml::to_string(&c).unwrap_or_default()
}

/// Unified diffs of canonical YAML, observed → desired, for each VM in the plan.
pub fn diff(
    plan: &Plan,
    desired: &crate::spec::DesiredState,
    observed: &ObservedState,
    style: &Style,
) -> String {
    let mut out = String::new();
    for vm in &plan.vms {
        let before = observed.vms.get(&vm.name).map(|o| {
            let mut c = o.config.clone();
            c.power_state = observed_power(o.state);
            canonical_yaml(&c)
        });
        let after = desired.vms.get(&vm.name).map(|d| canonical_yaml(&d.config));
        let (b, a) = (before.unwrap_or_default(), after.unwrap_or_default());
        let d = similar::TextDiff::from_lines(&b, &a);
        let text = d
            .unified_diff()
            .context_radius(3)
            .header(
                &format!("observed/{}", vm.name),
                &format!("desired/{}", vm.name),
            )
            .to_string();
        for line in text.lines() {
            let painted = if line.starts_with("+++") || line.starts_with("---") {
                style.bold(line)
            } else if line.starts_with('+') {
                style.green(line)
            } else if line.starts_with('-') {
                style.red(line)
            } else if line.starts_with("@@") {
                style.dim(line)
            } else {
                line.to_string()
            };
            let _ = writeln!(out, "{painted}");
        }
    }
    out
}
