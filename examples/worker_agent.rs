//! A stand-in proxy worker: registers with a live coordinator, follows its
//! watch stream and prints the routing table every time it changes.
//!
//! ```sh
//! cargo run --example worker_agent -- --coordinator http://127.0.0.1:6030 \
//!     --token "$(cat data/worker.token)" --name demo-worker
//! ```

use std::time::Duration;

use appproxy_coordinator::client::{Agent, RoutingTable};
use appproxy_coordinator::domain::WorkerRegistration;
use clap::Parser;
use tokio::sync::watch;

#[derive(Parser)]
struct Args {
    /// Base URL of the coordinator.
    #[arg(long, default_value = "http://127.0.0.1:6030")]
    coordinator: String,
    /// The worker bootstrap token.
    #[arg(long, env = "APPPROXY_WORKER_TOKEN", hide_env_values = true)]
    token: String,
    /// This worker's stable name.
    #[arg(long, default_value = "demo-worker")]
    name: String,
    /// Host users reach this worker's ports on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// First and last frontend port.
    #[arg(long, num_args = 2, default_values_t = [10205, 10300])]
    port_range: Vec<u16>,
    /// Heartbeat (and acknowledgement) interval.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
        "name": args.name,
        "api_url": "http://127.0.0.1:10201",
        "frontend": {"mode": "port", "host": args.host, "port_range": [args.port_range[0], args.port_range[1]]}
    }))?;
    let mut agent = Agent::new(&args.coordinator, &args.token, registration);
    agent.heartbeat_interval = args.heartbeat;
    let (table, mut changes) = watch::channel(RoutingTable::default());
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let printer = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            print_table(&changes.borrow_and_update());
        }
    });
    agent.run(table, stop).await;
    printer.abort();
    Ok(())
}

fn print_table(table: &RoutingTable) {
    println!(
        "revision {} — {} route(s)",
        table.revision,
        table.routes.len()
    );
    for route in table.routes.values() {
        let targets: Vec<String> = route
            .targets
            .iter()
            .map(|t| format!("{}:{}", t.host, t.port))
            .collect();
        println!(
            "  {:<32} {:<12} {} -> {}",
            route.frontend.url.as_deref().unwrap_or("-"),
            route.service,
            route.protocol,
            targets.join(", ")
        );
    }
}
