//! The key the controller signs task-executor requests with: from a file, or from a Secret it
//! creates with a fresh key on first start.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use sandbox_executor::SIGNING_KEY_SECRET_KEY;
use sandbox_executor::credential::{Seed, SigningKey, read_key_file};

use super::ExecutorKeySource;
use sandbox_domain::api::names;

/// The signing key `source` names (`None` for [`ExecutorKeySource::None`]).
pub async fn load(
    source: &ExecutorKeySource,
    client: &Client,
) -> anyhow::Result<Option<Arc<SigningKey>>> {
    let seed = match source {
        ExecutorKeySource::None => return Ok(None),
        ExecutorKeySource::File(path) => read_key_file::<Seed>(path)
            .with_context(|| format!("reading the executor signing key {}", path.display()))?,
        ExecutorKeySource::Secret { namespace, name } => {
            from_secret(Api::namespaced(client.clone(), namespace), name)
                .await
                .with_context(|| format!("the executor signing key in Secret {namespace}/{name}"))?
        }
    };
    let key = SigningKey::from_seed(&seed)?;
    tracing::info!(public_key = %key.public_key(), "signing executor requests");
    Ok(Some(Arc::new(key)))
}

/// Reads the seed from the Secret, creating the Secret with a fresh seed if it does not exist.
/// Replicas starting together race to create it; the losers read the winner's.
async fn from_secret(secrets: Api<Secret>, name: &str) -> anyhow::Result<Seed> {
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(name).await? {
            let Some(ByteString(bytes)) = secret
                .data
                .as_ref()
                .and_then(|d| d.get(SIGNING_KEY_SECRET_KEY))
            else {
                bail!("it has no key {SIGNING_KEY_SECRET_KEY:?}");
            };
            let text = std::str::from_utf8(bytes).context("the key is not text")?;
            return Ok(text.parse()?);
        }
        let seed = Seed::generate()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(BTreeMap::from([(
                    names::LABEL_MANAGED_BY.to_string(),
                    names::MANAGED_BY.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_string()),
            immutable: Some(true),
            data: Some(BTreeMap::from([(
                SIGNING_KEY_SECRET_KEY.to_string(),
                ByteString(seed.to_hex().into_bytes()),
            )])),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = name, "created a new executor signing key");
                return Ok(seed);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error.into()),
        }
    }
    bail!("it was created and deleted again while being read")
}
