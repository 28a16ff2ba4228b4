//! `sandbox-controller`: the command line; everything it runs lives in the library.

use std::path::Path;

use anyhow::Context;
use clap::Parser;
use sandbox_controller::cli::{Cli, Command};
use sandbox_controller::runtime::{self, RunConfig, WebhookSettings};
use sandbox_controller::webhook;
use sandbox_domain::api;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init_logging(cli.log_format);
    match cli.command {
        Command::Crdgen { out_dir } => crdgen(&out_dir),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.worker_threads))
            .enable_all()
            .build()?
            .block_on(runtime::run(
                RunConfig::from(args),
                runtime::shutdown_signal(),
            )),
        Command::Policy(command) => {
            let code = sandbox_policy::cli::run(command)?;
            std::process::exit(code);
        }
        Command::Webhook(args) => tokio::runtime::Runtime::new()?.block_on(runtime::run_webhook(
            WebhookSettings::from(args),
            runtime::shutdown_signal(),
        )),
        Command::WebhookCerts { out_dir, sans } => {
            webhook::write_certificates(&out_dir, &sans)?;
            let dir = out_dir.display();
            println!("wrote {dir}/{{ca.crt,tls.crt,tls.key}}; caBundle: base64 -w0 {dir}/ca.crt");
            Ok(())
        }
    }
}

fn crdgen(out_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for crd in api::all_crds() {
        let path = out_dir.join(api::crd_file_name(&crd));
        std::fs::write(&path, api::render_crd_yaml(&crd)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
