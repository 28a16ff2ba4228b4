//! Putting the task executor into a pod template, so users never write it by hand.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, PodSpec, Probe, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use sandbox_domain::api::names::EXECUTOR_CONTAINER_NAME;
use sandbox_executor::command::{COMMAND_PORT, EXECD_INSTALLER};
use sandbox_executor::credential::PublicKey;
use sandbox_executor::{DATA_VOLUME_NAME, DEFAULT_DATA_DIR, EXECUTOR_PORT, POD_UID_ENV};

/// Set by the controller on every pod into which it injected the executor, and removed from every
/// other pod it creates (whatever the template says): the controller sends task requests only to
/// pods that carry it.
pub const ANNOTATION_EXECUTOR_INJECTED: &str = "sandbox.opensandbox.io/task-executor-injected";

/// Adds the task executor as a sidecar container of `pod_spec`, listening on [`EXECUTOR_PORT`],
/// with its state on an `emptyDir` (so it survives a restart of the sidecar, not of the pod). It
/// also serves OpenSandbox's command API on [`COMMAND_PORT`], unless the pod brings OpenSandbox's
/// own execd (its [`EXECD_INSTALLER`] init container), which serves that port itself.
///
/// `image` must contain `sandbox-task-executor` on `PATH` and whatever the tasks run: tasks run
/// inside this container. With `public_key`, the executor accepts only requests the controller
/// signed for this very pod (it learns its pod UID from the downward API); with `None` it is
/// started with `--allow-unauthenticated`. No secret goes into the pod.
///
/// [`EXECUTOR_CONTAINER_NAME`] is reserved: a container, or init container, of that name in the
/// template is replaced by the injected one, so the controller never talks to an executor it did
/// not put there. Injecting twice gives the same pod spec.
pub fn inject_sidecar(pod_spec: &mut PodSpec, image: &str, public_key: Option<&PublicKey>) {
    pod_spec
        .containers
        .retain(|c| c.name != EXECUTOR_CONTAINER_NAME);
    if let Some(init) = pod_spec.init_containers.as_mut() {
        init.retain(|c| c.name != EXECUTOR_CONTAINER_NAME);
    }
    let mut args = vec![
        "--listen".to_string(),
        format!("0.0.0.0:{EXECUTOR_PORT}"),
        "--data-dir".to_string(),
        DEFAULT_DATA_DIR.to_string(),
    ];
    let own_execd = pod_spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == EXECD_INSTALLER);
    let mut ports = vec![ContainerPort {
        name: Some(EXECUTOR_CONTAINER_NAME.to_string()),
        container_port: i32::from(EXECUTOR_PORT),
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }];
    if !own_execd {
        args.extend([
            "--command-listen".to_string(),
            format!("0.0.0.0:{COMMAND_PORT}"),
        ]);
        ports.push(ContainerPort {
            name: Some("execd".to_string()),
            container_port: i32::from(COMMAND_PORT),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        });
    }
    let env = match public_key {
        Some(key) => {
            args.extend(["--controller-public-key".to_string(), key.to_string()]);
            vec![EnvVar {
                name: POD_UID_ENV.to_string(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.uid".to_string(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            }]
        }
        None => {
            args.push("--allow-unauthenticated".to_string());
            Vec::new()
        }
    };
    let health = HTTPGetAction {
        path: Some("/health".to_string()),
        port: IntOrString::Int(i32::from(EXECUTOR_PORT)),
        ..HTTPGetAction::default()
    };
    pod_spec.containers.push(Container {
        name: EXECUTOR_CONTAINER_NAME.to_string(),
        image: Some(image.to_string()),
        command: Some(vec!["sandbox-task-executor".to_string()]),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        ports: Some(ports),
        readiness_probe: Some(Probe {
            http_get: Some(health),
            period_seconds: Some(2),
            ..Probe::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME_NAME.to_string(),
            mount_path: DEFAULT_DATA_DIR.to_string(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    });
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == DATA_VOLUME_NAME) {
        volumes.push(Volume {
            name: DATA_VOLUME_NAME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
}

/// Prepares a pod the controller is about to create: with `inject`, adds the executor
/// ([`inject_sidecar`]) and marks the pod with [`ANNOTATION_EXECUTOR_INJECTED`]; without, only
/// removes any such mark the template carried.
pub fn prepare_pod(pod: &mut Pod, inject: bool, image: &str, public_key: Option<&PublicKey>) {
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.remove(ANNOTATION_EXECUTOR_INJECTED);
    }
    if !inject {
        return;
    }
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_EXECUTOR_INJECTED.to_string(), "true".to_string());
    if let Some(spec) = pod.spec.as_mut() {
        inject_sidecar(spec, image, public_key);
    }
}

/// True if the controller injected the executor into `pod`: the only pods it sends task
/// requests, and so credentials, to.
pub fn has_injected_executor(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_EXECUTOR_INJECTED))
        .is_some_and(|v| v == "true")
        && pod.spec.as_ref().is_some_and(has_executor)
}

/// True if the pod spec runs a task executor: a container, or a native sidecar (an init
/// container with `restartPolicy: Always`), named [`EXECUTOR_CONTAINER_NAME`].
pub fn has_executor(pod_spec: &PodSpec) -> bool {
    pod_spec
        .containers
        .iter()
        .any(|c| c.name == EXECUTOR_CONTAINER_NAME)
        || pod_spec.init_containers.iter().flatten().any(|c| {
            c.name == EXECUTOR_CONTAINER_NAME && c.restart_policy.as_deref() == Some("Always")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_executor::credential::{Seed, SigningKey};

    fn app_pod() -> PodSpec {
        PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("busybox".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }
    }

    fn public_key() -> PublicKey {
        SigningKey::from_seed(&Seed::generate().unwrap())
            .unwrap()
            .public_key()
    }

    #[test]
    fn injects_a_sidecar_that_holds_only_the_public_key_and_learns_its_pod_uid() {
        let key = public_key();
        let mut spec = app_pod();
        assert!(!has_executor(&spec));
        inject_sidecar(&mut spec, "registry.local/executor:1", Some(&key));
        assert!(has_executor(&spec));
        assert_eq!(spec.containers.len(), 2);
        assert_eq!(
            spec.containers[0].name, "app",
            "the user's containers keep their order"
        );
        let sidecar = &spec.containers[1];
        assert_eq!(sidecar.name, EXECUTOR_CONTAINER_NAME);
        assert_eq!(sidecar.image.as_deref(), Some("registry.local/executor:1"));
        let args = sidecar.args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:5758"]));
        assert!(
            args.windows(2)
                .any(|w| w == ["--controller-public-key", key.to_string().as_str()])
        );
        assert!(!args.contains(&"--allow-unauthenticated".to_string()));
        let env = sidecar.env.as_ref().unwrap();
        assert_eq!(env.len(), 1, "no secret, only the pod's own UID: {env:?}");
        let field = env[0]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (env[0].name.as_str(), field.field_path.as_str()),
            (POD_UID_ENV, "metadata.uid")
        );
        assert!(
            env.iter().all(|e| e
                .value_from
                .as_ref()
                .is_none_or(|v| v.secret_key_ref.is_none())),
            "nothing from a Secret"
        );
        assert_eq!(
            sidecar
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .map(|p| p.container_port)
                .collect::<Vec<_>>(),
            [5758, 44772]
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--command-listen", "0.0.0.0:44772"])
        );
        let probe = sidecar
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/health"));
        let mount = &sidecar.volume_mounts.as_ref().unwrap()[0];
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(mount.name, volume.name);
        assert!(volume.empty_dir.is_some());
    }

    #[test]
    fn pods_with_opensandboxs_own_execd_keep_its_port() {
        let mut spec = app_pod();
        spec.init_containers = Some(vec![Container {
            name: EXECD_INSTALLER.into(),
            ..Container::default()
        }]);
        inject_sidecar(&mut spec, "img", None);
        let sidecar = &spec.containers[1];
        assert!(
            !sidecar
                .args
                .as_ref()
                .unwrap()
                .contains(&"--command-listen".to_string())
        );
        assert_eq!(sidecar.ports.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn without_a_key_the_executor_runs_open() {
        let mut spec = app_pod();
        inject_sidecar(&mut spec, "img", None);
        let sidecar = &spec.containers[1];
        assert!(
            sidecar
                .args
                .as_ref()
                .unwrap()
                .contains(&"--allow-unauthenticated".to_string())
        );
        assert!(sidecar.env.is_none());
    }

    #[test]
    fn a_task_executor_of_the_template_is_replaced_and_injecting_twice_changes_nothing() {
        let key = public_key();
        let mut spec = app_pod();
        spec.containers.push(Container {
            name: EXECUTOR_CONTAINER_NAME.into(),
            image: Some("someone-elses/executor".into()),
            ..Container::default()
        });
        spec.init_containers = Some(vec![Container {
            name: EXECUTOR_CONTAINER_NAME.into(),
            restart_policy: Some("Always".into()),
            image: Some("another/executor".into()),
            ..Container::default()
        }]);
        inject_sidecar(&mut spec, "img", Some(&key));
        let executors: Vec<_> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name == EXECUTOR_CONTAINER_NAME)
            .collect();
        assert_eq!(executors.len(), 1, "only ours: {executors:?}");
        assert_eq!(executors[0].image.as_deref(), Some("img"));
        let once = spec.clone();
        inject_sidecar(&mut spec, "img", Some(&key));
        assert_eq!(spec, once);
    }

    #[test]
    fn only_pods_the_controller_injected_count_as_having_its_executor() {
        let key = public_key();
        let pod_with = |containers: PodSpec, annotation: Option<&str>| Pod {
            metadata: kube::api::ObjectMeta {
                annotations: annotation.map(|v| {
                    BTreeMap::from([(ANNOTATION_EXECUTOR_INJECTED.to_string(), v.to_string())])
                }),
                ..Default::default()
            },
            spec: Some(containers),
            ..Pod::default()
        };
        let mut own = app_pod();
        own.containers.push(Container {
            name: EXECUTOR_CONTAINER_NAME.into(),
            ..Container::default()
        });
        // A template that brings its own executor and claims the mark: without injection, the
        // mark is removed, so the controller never sends it a request.
        let mut forged = pod_with(own.clone(), Some("true"));
        assert!(has_injected_executor(&forged), "as written");
        prepare_pod(&mut forged, false, "img", Some(&key));
        assert!(!has_injected_executor(&forged));
        assert_eq!(forged.metadata.annotations, Some(BTreeMap::new()));

        let mut injected = pod_with(app_pod(), None);
        prepare_pod(&mut injected, true, "img", Some(&key));
        assert!(has_injected_executor(&injected));
        assert!(!has_injected_executor(&pod_with(app_pod(), Some("true"))));
    }
}
