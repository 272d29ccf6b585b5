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

use crate::annotations::{self, warning, PodChoice, Tuning};
use crate::config::{
    InjectConfig, SidecarMode, ADMIN_PORT, ADMIN_PORT_NAME, IGNORED_NAMESPACES, INBOUND_PORT,
    INIT_CONTAINER, OUTBOUND_PORT, POLICY_CONFIGMAP, POLICY_DIR, POLICY_FILE, POLICY_VOLUME,
    PROXY_CONTAINER, PROXY_UID, RUN_VOLUME, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS,
    TOKEN_FILE, TOKEN_VOLUME, VERSION,
};
use crate::patch::{PatchBuildError, PatchBuilder};
use crate::probes::{self, AppProbe};
use crate::syntax;

/// Annotation kubectl uses to pick the container of `logs`/`exec`.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Containers of other meshes: a pod that has one is left alone (two sidecars would fight over
/// the same traffic).
const OTHER_MESH_CONTAINERS: [&str; 6] = [
    "istio-proxy",
    "istio-init",
    "istio-validation",
    "linkerd-proxy",
    "linkerd-init",
    "linkerd-network-validator",
];

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

/// Inject or skip.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Patch the pod.
    Inject(Box<Injection>),
    /// Leave the pod alone.
    Skip(SkipReason),
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
/// `spec`). `namespace` is the pod's namespace when known.
pub fn inject(
    pod: &Value,
    namespace: Option<&str>,
    cfg: &InjectConfig,
) -> Result<Outcome, InjectError> {
    // Decoded from the borrowed tree: a copy of `pod` would be freed straight away.
    let typed = Pod::deserialize(pod).map_err(|e| InjectError::Decode(e.to_string()))?;
    let mut warnings = Vec::new();
    let Some(spec) = typed.spec.as_ref().filter(|s| !s.containers.is_empty()) else {
        return Ok(skip(SkipReason::NoContainers, warnings));
    };
    if let Some(reason) = skip_reason(&typed, spec, namespace, &mut warnings) {
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

/// The reason not to inject this pod, if any (pushing a warning for the surprising ones).
pub fn skip_reason(
    pod: &Pod,
    spec: &PodSpec,
    namespace: Option<&str>,
    warnings: &mut Vec<String>,
) -> Option<SkipReason> {
    let meta = &pod.metadata;
    if spec.host_network == Some(true) {
        return Some(SkipReason::HostNetwork);
    }
    let choice = annotations::pod_choice(meta.labels.as_ref(), meta.annotations.as_ref(), warnings);
    if choice == PodChoice::Disabled {
        return Some(SkipReason::OptedOut);
    }
    let user_containers = || {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
    };
    let injected_annotation = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotations::INJECTED));
    if injected_annotation
        || user_containers().any(|c| c.name == INIT_CONTAINER || c.name == PROXY_CONTAINER)
    {
        return Some(SkipReason::AlreadyInjected);
    }
    if let Some(ns) = namespace.filter(|ns| IGNORED_NAMESPACES.contains(ns)) {
        if choice == PodChoice::Enabled {
            warnings.push(warning(format!(
                "moat-injector never injects pods in namespace {ns}"
            )));
        }
        return Some(SkipReason::SystemNamespace);
    }
    if spec.os.as_ref().is_some_and(|os| os.name == "windows") {
        warnings.push(warning("moat-injector does not inject Windows pods"));
        return Some(SkipReason::WindowsPod);
    }
    if let Some(c) = user_containers().find(|c| OTHER_MESH_CONTAINERS.contains(&c.name.as_str())) {
        warnings.push(warning(format!(
            "not injected: container {} belongs to another service mesh",
            syntax::shorten(&c.name, 40)
        )));
        return Some(SkipReason::OtherMesh);
    }
    let pod_sc = spec.security_context.as_ref();
    for c in user_containers() {
        let sc = c.security_context.as_ref();
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(pod_sc.and_then(|s| s.run_as_user));
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(pod_sc.and_then(|s| s.run_as_group));
        if uid == Some(PROXY_UID) || gid == Some(PROXY_UID) {
            warnings.push(warning(format!(
                "not injected: container {} runs as uid/gid {PROXY_UID}, its traffic would bypass the mesh",
                syntax::shorten(&c.name, 30)
            )));
            return Some(SkipReason::ProxyUidConflict);
        }
        if let Some(p) = c
            .ports
            .iter()
            .flatten()
            .find(|p| [ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT].contains(&p.container_port))
        {
            warnings.push(warning(format!(
                "not injected: container {} uses port {}, reserved for moat-proxy",
                syntax::shorten(&c.name, 30),
                p.container_port
            )));
            return Some(SkipReason::PortConflict);
        }
    }
    if let Some(v) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| [TOKEN_VOLUME, POLICY_VOLUME, RUN_VOLUME].contains(&v.name.as_str()))
    {
        warnings.push(warning(format!(
            "not injected: volume name {} is reserved for Moat",
            v.name
        )));
        return Some(SkipReason::NameConflict);
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
        &PROXY_UID.to_string(),
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
    args
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
    let env = vec![
        field_ref("MOAT_POD_NAME", "metadata.name"),
        field_ref("MOAT_POD_NAMESPACE", "metadata.namespace"),
        field_ref("MOAT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_ref("MOAT_POD_IP", "status.podIP"),
        literal("MOAT_TRUST_DOMAIN", cfg.trust_domain.as_str()),
        literal("MOAT_CA_URL", &cfg.ca_url),
        literal("MOAT_TOKEN_FILE", TOKEN_FILE),
        literal("MOAT_TRUST_BUNDLE_PEM", &cfg.trust_bundle_pem),
        literal("MOAT_MESH_NETWORKS", &cfg.mesh_networks_env()),
        literal("MOAT_POLICY", POLICY_FILE),
        literal("MOAT_LOG_LEVEL", &tuning.log_level),
        literal("MOAT_APP_PROBES", &probes::to_env(app_probes)),
    ];
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
            run_as_group: Some(PROXY_UID),
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
