//! `jobctl worker`: this process serves job functions to jobd, through the
//! client library's [`Worker`], until SIGINT or SIGTERM drains it.
//!
//! It exists so that serving a function needs no Rust: `--noop NAME` serves
//! a function that returns its argument at once (the load `jobctl bench
//! --worker-slots` puts on the worker protocol).

use std::time::Duration;

use clap::Args;
use jobd_client::{ConnectOptions, Ctx, Worker};

use crate::{
    cli::{parse_label, parse_seconds},
    failure::Failure,
};

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("functions").required(true).multiple(true).args(["noop"])
))]
pub(crate) struct Serve {
    /// Serve NAME as a function that returns its argument at once (for
    /// benchmarks); repeat for more.
    #[arg(long = "noop", value_name = "NAME")]
    pub(crate) noop: Vec<String>,

    /// How many jobs to run at once [default: one per CPU].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) concurrency: Option<u32>,

    /// A label of this worker: jobs submitted with --worker-label go only
    /// to workers carrying all of theirs; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,

    /// What this worker calls itself in `jobctl workers` [default: jobctl].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// Seconds running jobs get to finish after SIGINT or SIGTERM; what
    /// still runs then is given back to jobd, which runs it elsewhere.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    pub(crate) grace: Duration,
}

/// The description jobd lists for a `--noop` function.
const NOOP_DESCRIPTION: &str = "Returns its argument at once (jobctl worker --noop)";

/// Runs the worker `args` describes against the jobd at `addr` until SIGINT
/// or SIGTERM, then drains it. jobd need not be up yet: the worker waits
/// for it, and for it to come back after a restart.
pub(crate) async fn serve(
    addr: &str,
    options: ConnectOptions,
    args: &Serve,
) -> Result<(), Failure> {
    let mut worker = Worker::new(addr)
        .connect_options(options)
        .version(concat!("jobctl ", env!("CARGO_PKG_VERSION")))
        .grace(args.grace);
    if let Some(slots) = args.concurrency {
        worker = worker.slots(slots);
    }
    if let Some(name) = &args.name {
        worker = worker.name(name);
    }
    for (key, value) in &args.labels {
        worker = worker.label(key, value);
    }
    for name in &args.noop {
        worker = worker
            .register_async(
                name,
                NOOP_DESCRIPTION,
                |_ctx: Ctx, args| async move { Ok(args) },
            )
            .returns("its argument, unchanged");
    }
    worker.run(stop_signal()).await?;
    Ok(())
}

/// SIGINT or SIGTERM, whichever comes first: both drain the worker. If a
/// handler cannot be installed that signal keeps its default (it ends the
/// process at once), rather than the worker refusing to start.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        Ok(()) = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
