//! The injection decision and the patch: whether a pod gets Moat, and the RFC 6902 patch that
//! adds the redirection init container, the sidecar, its volumes, the probe rewrites and the
//! status annotation. The webhook and the offline `inject -f` both call [`inject`].

use std::collections::BTreeMap;

use json_patch::Patch;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use serde_json::Value;

use json_patch::{AddOperation, PatchOperation};
use moat_core::contract;

use crate::annotations::{self, warning, PodChoice, Tuning};
use crate::config::{
    InjectConfig, SidecarMode, ADMIN_PORT, ADMIN_PORT_NAME, IGNORED_NAMESPACES, INBOUND_PORT,
    INIT_CONTAINER, OUTBOUND_PORT, POLICY_CONFIGMAP, POLICY_DIR, POLICY_FILE, POLICY_VOLUME,
    PROXY_CONTAINER, PROXY_GID, PROXY_UID, RUN_DIR, RUN_VOLUME, TOKEN_AUDIENCE, TOKEN_DIR,
    TOKEN_EXPIRATION_SECONDS, TOKEN_FILE, TOKEN_VOLUME, VERSION,
};
use crate::enforce::{self, OptOut, Violation};
use crate::patch::{PatchBuildError, PatchBuilder};
use crate::probes::{self, AppProbe};
use crate::syntax;

/// Annotation kubectl uses to pick the container of `logs`/`exec`.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Which rules apply to a pod, from where it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The webhook, for a namespace labelled `moat.dev/inject=enabled`: opt-outs and conflicts
    /// are refused unless the platform allowed them, Moat's parts already in the pod are
    /// never trusted.
    Enforcing,
    /// The webhook, for a pod that opted in from a namespace without the label: opt-outs and
    /// conflicts leave it uninjected (with a warning); Moat's parts are never trusted.
    OptIn,
    /// `inject -f`: as [`Scope::OptIn`], except that a manifest marked as injected is left as
    /// it is (the webhook checks it again when its pods are created).
    Offline,
}

/// Where a pod is injected.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The pod's namespace when known.
    pub namespace: Option<&'a str>,
    /// The rules that apply.
    pub scope: Scope,
}

/// Why a pod is admitted without injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The pod has no spec or no containers.
    NoContainers,
    /// `hostNetwork: true`: the rules would reprogram the node.
    HostNetwork,
    /// `moat.dev/inject: disabled`.
    OptedOut,
    /// The status annotation or Moat's containers are already there.
    AlreadyInjected,
    /// A system or Moat control-plane namespace.
    SystemNamespace,
    /// A Windows pod (no iptables).
    WindowsPod,
    /// Another mesh's sidecar is present.
    OtherMesh,
    /// An app container runs as the proxy's uid or gid, so its traffic would bypass the mesh.
    ProxyUidConflict,
    /// An app container declares one of the proxy's ports.
    PortConflict,
    /// A volume already uses one of Moat's volume names.
    NameConflict,
}

impl SkipReason {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::NoContainers => "no_containers",
            SkipReason::HostNetwork => "host_network",
            SkipReason::OptedOut => "opted_out",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::SystemNamespace => "system_namespace",
            SkipReason::WindowsPod => "windows_pod",
            SkipReason::OtherMesh => "other_mesh",
            SkipReason::ProxyUidConflict => "proxy_uid_conflict",
            SkipReason::PortConflict => "port_conflict",
            SkipReason::NameConflict => "name_conflict",
        }
    }
}

/// The `moat.dev/injected` annotation value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InjectionStatus {
    /// Injector version.
    pub version: String,
    /// `native` or `classic`.
    pub mode: String,
    /// Containers added.
    pub containers: Vec<String>,
    /// Volumes added.
    pub volumes: Vec<String>,
    /// Probes rewritten (`<container>/<probe>`).
    pub probes: Vec<String>,
}

/// A successful injection.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The RFC 6902 patch, relative to the pod (or pod template).
    pub patch: Patch,
    /// The pod with the patch applied.
    pub patched: Value,
    /// What was added.
    pub status: InjectionStatus,
}

/// Inject, skip or refuse.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Patch the pod.
    Inject(Box<Injection>),
    /// Leave the pod alone.
    Skip(SkipReason),
    /// Refuse the pod (enforcing namespaces only): what it must not do, each naming the field.
    Refuse(Vec<Violation>),
}

impl SkipReason {
    /// The skip an allowed (or, outside enforcing namespaces, tolerated) opt-out leads to;
    /// `None` for those that do not prevent injection.
    pub fn of(what: OptOut) -> Option<SkipReason> {
        match what {
            OptOut::InjectDisabled => Some(SkipReason::OptedOut),
            OptOut::Windows => Some(SkipReason::WindowsPod),
            OptOut::OtherMesh => Some(SkipReason::OtherMesh),
            OptOut::ProxyUid => Some(SkipReason::ProxyUidConflict),
            OptOut::PortConflict => Some(SkipReason::PortConflict),
            OptOut::NameConflict => Some(SkipReason::NameConflict),
            OptOut::NetAdmin | OptOut::Exclusions => None,
        }
    }
}

/// The decision plus the warnings for the user.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Inject or skip.
    pub decision: Decision,
    /// Admission warnings (each at most 120 characters).
    pub warnings: Vec<String>,
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The object is not a pod the Kubernetes types can read.
    #[error("pod cannot be decoded: {0}")]
    Decode(String),
    /// The generated patch does not apply (a bug in the injector).
    #[error("internal error: {0}")]
    Patch(#[from] PatchBuildError),
    /// The patched pod is not a valid pod any more (a bug in the injector).
    #[error("internal error: patched pod does not decode: {0}")]
    Result(String),
}

impl InjectError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            InjectError::Decode(_) => "undecodable_object",
            InjectError::Patch(_) => "patch_does_not_apply",
            InjectError::Result(_) => "invalid_result",
        }
    }
}

/// Decides and builds the injection for `pod` (a Pod, or a pod template: `metadata` and
/// `spec`) as `inject -f` does ([`Scope::Offline`]). `namespace` is the pod's namespace when
/// known.
pub fn inject(
    pod: &Value,
    namespace: Option<&str>,
    cfg: &InjectConfig,
) -> Result<Outcome, InjectError> {
    inject_in(
        pod,
        &Context {
            namespace,
            scope: Scope::Offline,
        },
        cfg,
    )
}

/// Decides and builds the injection for `pod` in `ctx`. In the webhook's scopes, anything only
/// the injector writes (status annotation, `moat-init`/`moat-proxy`, Moat's volumes) is first
/// removed and the pod injected afresh: a pod the injector already injected with the same
/// configuration (an API server re-invocation) gets no patch, anything else is replaced.
pub fn inject_in(pod: &Value, ctx: &Context, cfg: &InjectConfig) -> Result<Outcome, InjectError> {
    if ctx.scope == Scope::Offline || !enforce::has_moat_parts(pod) {
        return decide(pod, ctx, cfg);
    }
    let stripped = enforce::strip(pod);
    let mut outcome = decide(&stripped, ctx, cfg)?;
    match &mut outcome.decision {
        Decision::Inject(injection) if injection.patched == *pod => {
            outcome.decision = Decision::Skip(SkipReason::AlreadyInjected);
        }
        Decision::Inject(injection) => {
            if moat_parts(pod) != moat_parts(&injection.patched) {
                outcome.warnings.push(warning(
                    "moat-injector: Moat's containers, volumes or annotation in the pod were replaced by the injector's own",
                ));
            }
            injection.patch = rebase(pod, &injection.patched);
        }
        // A pod whose only containers carry Moat's names would otherwise run them unmeshed.
        Decision::Skip(SkipReason::NoContainers) if ctx.scope == Scope::Enforcing => {
            outcome.decision = Decision::Refuse(vec![Violation {
                what: OptOut::NameConflict,
                message: format!("spec.containers: {INIT_CONTAINER} and {PROXY_CONTAINER} are reserved for Moat; rename the containers"),
            }]);
        }
        _ => {}
    }
    Ok(outcome)
}

/// What the injector writes into a pod, to tell a re-invocation from a forgery.
fn moat_parts(pod: &Value) -> (Value, Vec<Value>, Vec<Value>) {
    let named = |p: &str, names: &[&str]| -> Vec<Value> {
        pod.pointer(p)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| {
                c.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| names.contains(&n))
            })
            .cloned()
            .collect()
    };
    let containers = [INIT_CONTAINER, PROXY_CONTAINER];
    let mut cs = named("/spec/initContainers", &containers);
    cs.extend(named("/spec/containers", &containers));
    (
        pod.pointer("/metadata/annotations")
            .and_then(|a| a.get(annotations::INJECTED))
            .cloned()
            .unwrap_or(Value::Null),
        cs,
        named("/spec/volumes", &[TOKEN_VOLUME, POLICY_VOLUME, RUN_VOLUME]),
    )
}

/// A patch turning `original` into `target` where only `spec` and `metadata` differ: each
/// differing member is replaced whole (`add` replaces an existing member), which always
/// applies to the object the API server sent.
fn rebase(original: &Value, target: &Value) -> json_patch::Patch {
    let mut ops = Vec::new();
    for key in ["metadata", "spec"] {
        if let Some(v) = target.get(key).filter(|v| original.get(key) != Some(*v)) {
            if let Ok(path) = json_patch::jsonptr::PointerBuf::parse(format!("/{key}")) {
                ops.push(PatchOperation::Add(AddOperation {
                    path,
                    value: v.clone(),
                }));
            }
        }
    }
    json_patch::Patch(ops)
}

fn decide(pod: &Value, ctx: &Context, cfg: &InjectConfig) -> Result<Outcome, InjectError> {
    // Decoded from the borrowed tree: a copy of `pod` would be freed straight away.
    let typed = Pod::deserialize(pod).map_err(|e| InjectError::Decode(e.to_string()))?;
    let mut warnings = Vec::new();
    let Some(spec) = typed.spec.as_ref().filter(|s| !s.containers.is_empty()) else {
        return Ok(skip(SkipReason::NoContainers, warnings));
    };
    if let Some(reason) = skip_reason(&typed, spec, ctx, &mut warnings) {
        return Ok(skip(reason, warnings));
    }
    let found = enforce::violations(&typed, spec, &cfg.enforcement);
    if ctx.scope == Scope::Enforcing {
        let (allowed, refused): (Vec<Violation>, Vec<Violation>) = found
            .into_iter()
            .partition(|v| cfg.enforcement.allows(ctx.namespace, v.what));
        if !refused.is_empty() {
            return Ok(Outcome {
                decision: Decision::Refuse(refused),
                warnings,
            });
        }
        for v in &allowed {
            warnings.push(warning(format!(
                "allowed by the platform ({}): {}",
                v.what.key(),
                v.message
            )));
        }
        if let Some(reason) = allowed.iter().find_map(|v| SkipReason::of(v.what)) {
            return Ok(skip(reason, warnings));
        }
    } else if let Some((v, reason)) = found
        .iter()
        .find_map(|v| SkipReason::of(v.what).map(|r| (v, r)))
    {
        // The pod opted itself in: whatever keeps it out only concerns its own author.
        if v.what != OptOut::InjectDisabled {
            warnings.push(warning(format!("not injected: {}", v.message)));
        }
        return Ok(skip(reason, warnings));
    }
    let tuning = annotations::tuning(typed.metadata.annotations.as_ref(), cfg, &mut warnings);
    let mode = tuning.sidecar_mode;
    let mut b = PatchBuilder::new(pod.clone());

    // Probes first: their paths use the original container indices.
    let mut app_probes = BTreeMap::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let index = i.to_string();
        probes::rewrite(
            &mut b,
            &["spec", "containers", &index],
            c,
            &mut app_probes,
            &mut warnings,
        )?;
    }
    if mode == SidecarMode::Native {
        // User sidecars start after moat-proxy, so the proxy can answer their probes too. (In
        // classic mode the proxy starts after every init container: those are left alone.)
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            if c.restart_policy.as_deref() == Some("Always") {
                let index = i.to_string();
                probes::rewrite(
                    &mut b,
                    &["spec", "initContainers", &index],
                    c,
                    &mut app_probes,
                    &mut warnings,
                )?;
            }
        }
    }

    // The sidecar's admin socket lives in the run directory; read-only, an app can connect()
    // to it (classic-mode Jobs stop their sidecar with POST /shutdown) but not replace it.
    for (i, c) in spec.containers.iter().enumerate() {
        let taken = c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == RUN_DIR);
        if taken {
            warnings.push(warning(format!(
                "container {} already mounts {RUN_DIR}: it cannot reach the sidecar's admin socket",
                syntax::shorten(&c.name, 30)
            )));
            continue;
        }
        let index = i.to_string();
        b.append(
            &["spec", "containers", &index, "volumeMounts"],
            vec![to_value(&run_mount(true))?],
        )?;
    }

    let init = to_value(&init_container(cfg, &tuning))?;
    let proxy = to_value(&proxy_container(cfg, &tuning, &app_probes, mode))?;
    match mode {
        SidecarMode::Native => b.prepend(&["spec", "initContainers"], vec![init, proxy])?,
        SidecarMode::Classic => {
            // Last, so user init containers still have an unredirected network (the proxy is
            // not running yet); the proxy itself is an ordinary container.
            b.append(&["spec", "initContainers"], vec![init])?;
            b.append(&["spec", "containers"], vec![proxy])?;
        }
    }
    let vols = volumes()
        .iter()
        .map(to_value)
        .collect::<Result<Vec<_>, _>>()?;
    b.append(&["spec", "volumes"], vols)?;

    let status = InjectionStatus {
        version: VERSION.into(),
        mode: mode.as_str().into(),
        containers: vec![INIT_CONTAINER.into(), PROXY_CONTAINER.into()],
        volumes: vec![TOKEN_VOLUME.into(), POLICY_VOLUME.into(), RUN_VOLUME.into()],
        probes: app_probes.keys().cloned().collect(),
    };
    let mut entries = vec![(
        annotations::INJECTED.to_string(),
        Value::String(
            serde_json::to_string(&status).map_err(|e| InjectError::Result(e.to_string()))?,
        ),
    )];
    let has_default = typed
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(DEFAULT_CONTAINER_ANNOTATION));
    if let Some(first) = spec.containers.first().filter(|_| !has_default) {
        entries.push((
            DEFAULT_CONTAINER_ANNOTATION.to_string(),
            Value::String(first.name.clone()),
        ));
    }
    b.set_entries(&["metadata", "annotations"], entries)?;

    let (patch, patched) = b.finish();
    // The result must still be a pod.
    Pod::deserialize(&patched).map_err(|e| InjectError::Result(e.to_string()))?;
    Ok(Outcome {
        decision: Decision::Inject(Box::new(Injection {
            patch,
            patched,
            status,
        })),
        warnings,
    })
}

fn skip(reason: SkipReason, warnings: Vec<String>) -> Outcome {
    Outcome {
        decision: Decision::Skip(reason),
        warnings,
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, InjectError> {
    serde_json::to_value(v).map_err(|e| InjectError::Result(e.to_string()))
}

/// The reason not to inject this pod that holds whatever the namespace enforces, if any
/// (pushing a warning for the surprising ones). Opt-outs and conflicts are
/// [`enforce::violations`].
pub fn skip_reason(
    pod: &Pod,
    spec: &PodSpec,
    ctx: &Context,
    warnings: &mut Vec<String>,
) -> Option<SkipReason> {
    let meta = &pod.metadata;
    if spec.host_network == Some(true) {
        return Some(SkipReason::HostNetwork);
    }
    let choice = annotations::pod_choice(meta.labels.as_ref(), meta.annotations.as_ref(), warnings);
    if ctx.scope == Scope::Offline {
        if choice == PodChoice::Disabled {
            return Some(SkipReason::OptedOut);
        }
        let injected_annotation = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(annotations::INJECTED));
        let moat_container = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == INIT_CONTAINER || c.name == PROXY_CONTAINER);
        if injected_annotation || moat_container {
            return Some(SkipReason::AlreadyInjected);
        }
    }
    if let Some(ns) = ctx.namespace.filter(|ns| IGNORED_NAMESPACES.contains(ns)) {
        if choice == PodChoice::Enabled {
            warnings.push(warning(format!(
                "moat-injector never injects pods in namespace {ns}"
            )));
        }
        return Some(SkipReason::SystemNamespace);
    }
    None
}

/// An env var value taken literally: Kubernetes expands `$(VAR)` in env values, `$$` is `$`.
fn literal(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.replace('$', "$$")),
        value_from: None,
    }
}

fn field_ref(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

fn quantities(cpu: &str, memory: &str) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_string(), Quantity(cpu.to_string())),
        ("memory".to_string(), Quantity(memory.to_string())),
    ])
}

fn runtime_default() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    })
}

/// The arguments of `moat-proxy init` for this pod.
pub fn init_args(tuning: &Tuning) -> Vec<String> {
    let mut args: Vec<String> = [
        "init",
        "--inbound-port",
        &INBOUND_PORT.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--proxy-gid",
        &PROXY_GID.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !tuning.skip_inbound_ports.is_empty() {
        args.push("--exclude-inbound-ports".into());
        args.push(syntax::format_list(&tuning.skip_inbound_ports));
    }
    if !tuning.skip_outbound_ports.is_empty() {
        args.push("--exclude-outbound-ports".into());
        args.push(syntax::format_list(&tuning.skip_outbound_ports));
    }
    if !tuning.skip_outbound_cidrs.is_empty() {
        args.push("--exclude-outbound-cidrs".into());
        args.push(syntax::format_list(&tuning.skip_outbound_cidrs));
    }
    if !tuning.skip_outbound_endpoints.is_empty() {
        args.push("--exclude-outbound-endpoints".into());
        args.push(format_endpoints(&tuning.skip_outbound_endpoints));
    }
    args
}

/// `CIDR=PORTS,...` as `moat-proxy init --exclude-outbound-endpoints` reads it.
pub fn format_endpoints(endpoints: &[(syntax::Cidr, syntax::PortRange)]) -> String {
    endpoints
        .iter()
        .map(|(c, p)| format!("{c}={p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The mount of the run directory: read-write in the sidecar, read-only in the apps.
fn run_mount(read_only: bool) -> VolumeMount {
    VolumeMount {
        name: RUN_VOLUME.into(),
        mount_path: RUN_DIR.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// The `moat-init` container: programs the pod's nat table as root with NET_ADMIN and
/// NET_RAW only, then exits.
pub fn init_container(cfg: &InjectConfig, tuning: &Tuning) -> Container {
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        args: Some(init_args(tuning)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("10m", "16Mi")),
            limits: Some(quantities("100m", "64Mi")),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: runtime_default(),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: RUN_VOLUME.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// The `moat-proxy` sidecar.
pub fn proxy_container(
    cfg: &InjectConfig,
    tuning: &Tuning,
    app_probes: &BTreeMap<String, AppProbe>,
    mode: SidecarMode,
) -> Container {
    let r = &tuning.resources;
    let mut env = vec![
        field_ref("MOAT_POD_NAME", "metadata.name"),
        field_ref("MOAT_POD_NAMESPACE", "metadata.namespace"),
        field_ref("MOAT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_ref("MOAT_POD_IP", "status.podIP"),
        // The kubelet probes from the node: the proxy accepts /app-health only from it.
        field_ref(contract::ENV_HOST_IP, "status.hostIP"),
        literal(contract::ENV_ADMIN_SOCKET, contract::ADMIN_SOCKET),
        literal("MOAT_TRUST_DOMAIN", cfg.trust_domain.as_str()),
        literal("MOAT_CA_URL", &cfg.ca_url),
        literal("MOAT_TOKEN_FILE", TOKEN_FILE),
        literal("MOAT_TRUST_BUNDLE_PEM", &cfg.trust_bundle_pem),
        literal("MOAT_MESH_NETWORKS", &cfg.mesh_networks_env()),
        literal("MOAT_POLICY", POLICY_FILE),
        literal("MOAT_LOG_LEVEL", &tuning.log_level),
        literal("MOAT_APP_PROBES", &probes::to_env(app_probes)),
    ];
    if let Some(addr) = &cfg.destination_addr {
        env.push(literal("MOAT_DESTINATION_ADDR", addr.as_str()));
    }
    if !cfg.service_networks.is_empty() {
        env.push(literal(
            "MOAT_SERVICE_NETWORKS",
            &crate::syntax::format_list(&cfg.service_networks),
        ));
    }
    let native = mode == SidecarMode::Native;
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        args: Some(vec!["run".into()]),
        restart_policy: native.then(|| "Always".to_string()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&r.cpu_request, &r.memory_request)),
            limits: Some(quantities(&r.cpu_limit, &r.memory_limit)),
            ..Default::default()
        }),
        // Native: the app containers start only once the proxy is ready (at most 2 minutes).
        startup_probe: native.then(|| admin_probe("/ready", 1, 120)),
        readiness_probe: Some(admin_probe("/ready", 5, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_GID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: runtime_default(),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: POLICY_VOLUME.into(),
                mount_path: POLICY_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            run_mount(false),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The volumes Moat adds.
pub fn volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: POLICY_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: POLICY_CONFIGMAP.into(),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: RUN_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Default::default()
        },
    ]
}
