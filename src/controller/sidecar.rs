//! Putting the task executor into a pod template, so users never write it by hand.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, PodSpec,
    Probe, SecretKeySelector, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use sandbox_executor::{
    DATA_VOLUME_NAME, DEFAULT_DATA_DIR, EXECUTOR_CONTAINER_NAME, EXECUTOR_PORT, TOKEN_ENV,
    TOKEN_SECRET_KEY,
};

/// Adds the task executor as a sidecar container of `pod_spec`, listening on [`EXECUTOR_PORT`],
/// with its state on an `emptyDir` (so it survives a restart of the sidecar, not of the pod).
///
/// `image` must contain `sandbox-task-executor` on `PATH` and whatever the tasks run: tasks run
/// inside this container. `token_secret` names a Secret in the pod's namespace whose
/// [`TOKEN_SECRET_KEY`] key holds the bearer token; with `None` the executor is started with
/// `--allow-unauthenticated`.
///
/// Idempotent: a pod spec that already has a container named [`EXECUTOR_CONTAINER_NAME`] is left
/// unchanged, so a user-written sidecar wins.
pub fn inject_sidecar(pod_spec: &mut PodSpec, image: &str, token_secret: Option<&str>) {
    if has_executor(pod_spec) {
        return;
    }
    let mut args = vec![
        "--listen".to_string(),
        format!("0.0.0.0:{EXECUTOR_PORT}"),
        "--data-dir".to_string(),
        DEFAULT_DATA_DIR.to_string(),
    ];
    let env = match token_secret {
        Some(secret) => vec![EnvVar {
            name: TOKEN_ENV.to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.to_string(),
                    key: TOKEN_SECRET_KEY.to_string(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }],
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
        ports: Some(vec![ContainerPort {
            name: Some(EXECUTOR_CONTAINER_NAME.to_string()),
            container_port: i32::from(EXECUTOR_PORT),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
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

    #[test]
    fn injects_a_sidecar_reading_the_token_from_the_secret() {
        let mut spec = app_pod();
        assert!(!has_executor(&spec));
        inject_sidecar(
            &mut spec,
            "registry.local/executor:1",
            Some("executor-token"),
        );
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
        assert!(!args.contains(&"--allow-unauthenticated".to_string()));
        let env = sidecar.env.as_ref().unwrap();
        let secret = env[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (
                env[0].name.as_str(),
                secret.name.as_str(),
                secret.key.as_str()
            ),
            (TOKEN_ENV, "executor-token", "token")
        );
        assert_eq!(sidecar.ports.as_ref().unwrap()[0].container_port, 5758);
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
    fn without_a_secret_the_executor_runs_open() {
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
    fn injecting_twice_changes_nothing_and_user_sidecars_win() {
        let mut spec = app_pod();
        inject_sidecar(&mut spec, "img", Some("s"));
        let once = spec.clone();
        inject_sidecar(&mut spec, "other", None);
        assert_eq!(spec, once);

        let mut native = app_pod();
        native.init_containers = Some(vec![Container {
            name: EXECUTOR_CONTAINER_NAME.into(),
            restart_policy: Some("Always".into()),
            ..Container::default()
        }]);
        let before = native.clone();
        inject_sidecar(&mut native, "img", None);
        assert_eq!(native, before);
    }
}
