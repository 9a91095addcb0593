//! `sluice`: the broker server and its admin command line.
//!
//! This file only parses arguments and wires the pieces: configuration in [`config`], the
//! server in [`server`], the admin API client in [`admin`]. Exit status: 0 on success, 1
//! when the server or an admin call fails, 2 for usage and configuration errors.

mod admin;
mod bench;
mod client_cmds;
mod config;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_admin::api::{
    CreateGroup, CreateTopic, MessageQuery, MessageType, ResendDeadLetters, ResetOffset, Start,
    UpdateGroup, UpdateTopic,
};

use crate::admin::Admin;
use crate::config::{Config, FlushMode, Overrides};

/// mimalloc instead of glibc's malloc: the gRPC path allocates per request on every
/// runtime worker, and glibc's arena locks and frees cost ≈ 20% of the CPU of
/// unbatched sends (measured with `grpc_bench` under `perf`; docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:8080";
const DEFAULT_ENDPOINT: &str = "127.0.0.1:8081";

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A RocketMQ-5-compatible message broker"
)]
struct Cli {
    /// Address of the admin API used by the admin commands [default: http://127.0.0.1:8080].
    #[arg(long, global = true, env = "SLUICE_ADMIN", value_name = "URL")]
    admin: Option<String>,
    /// Bearer token of the admin API, if the server has one (`[server] admin_token`).
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// Print the admin API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// gRPC endpoint used by send, consume and bench [default: 127.0.0.1:8081].
    #[arg(long, global = true, env = "SLUICE_ENDPOINT", value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// Namespace of the topics and groups named (`t` means `NAMESPACE%t`); lists show only
    /// the namespace's.
    #[arg(
        long,
        global = true,
        env = "SLUICE_NAMESPACE",
        value_name = "NAMESPACE"
    )]
    namespace: Option<String>,
    /// Access key that signs the requests of send, consume and bench (with --secret-key),
    /// for a server with an ACL.
    #[arg(long, global = true, env = "SLUICE_ACCESS_KEY", value_name = "KEY")]
    access_key: Option<String>,
    /// Secret key of --access-key (prefer the environment variable: flags show in `ps`).
    #[arg(
        long,
        global = true,
        env = "SLUICE_SECRET_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    secret_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Server(ServerArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    #[command(flatten)]
    Admin(AdminCommand),
    /// Send messages through the gRPC API.
    Send(client_cmds::SendArgs),
    /// Receive (and acknowledge) messages through the gRPC API.
    Consume(client_cmds::ConsumeArgs),
    /// Load-test a RocketMQ 5 gRPC endpoint (OpenMessaging-Benchmark style).
    Bench(bench::BenchArgs),
}

/// Commands that call the admin API.
#[derive(Subcommand)]
enum AdminCommand {
    /// Manage topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Manage consumer groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Look up stored messages.
    #[command(subcommand)]
    Message(MessageCommand),
    /// Show the broker's version, uptime and disk usage.
    Status,
}

/// Configuration sources of `sluice server` (see docs/configuration.md).
#[derive(Args)]
struct ServerArgs {
    /// TOML file overriding the built-in defaults.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: ./sluice-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Admin API address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// When a sent message counts as stored [default: sync].
    #[arg(long, value_enum)]
    flush: Option<FlushMode>,
}

impl ServerArgs {
    fn load(&self) -> Result<Config, config::ConfigErrors> {
        let flags = Overrides {
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            admin_listen: self.admin_listen,
            flush: self.flush,
        };
        Config::load(self.config.as_deref(), std::env::vars_os(), &flags)
    }
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Print secrets (the admin token) instead of hiding them.
    #[arg(long)]
    show_secrets: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the configuration in effect (defaults, file, environment, flags) as TOML.
    Show(ShowArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum TopicType {
    Normal,
    Fifo,
    Delay,
    Transaction,
}

impl From<TopicType> for MessageType {
    fn from(t: TopicType) -> MessageType {
        match t {
            TopicType::Normal => MessageType::Normal,
            TopicType::Fifo => MessageType::Fifo,
            TopicType::Delay => MessageType::Delay,
            TopicType::Transaction => MessageType::Transaction,
        }
    }
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Messages the topic accepts.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: TopicType,
        /// Number of queues [default: 8].
        #[arg(long)]
        queues: Option<u32>,
    },
    /// List topics.
    List,
    /// Show a topic with the offsets of each queue.
    Describe { name: String },
    /// Change a topic's type or grow its queue count.
    Update {
        name: String,
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: Option<TopicType>,
        #[arg(long)]
        queues: Option<u32>,
    },
    /// Delete a topic; its stored messages age out with retention.
    Delete { name: String },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a consumer group.
    Create {
        name: String,
        /// Deliver each message group in order.
        #[arg(long)]
        fifo: bool,
        /// Deliveries before a message goes to the dead-letter topic [default: 17].
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Where to start on queues never read: earliest, latest (default), or a time
        /// (RFC 3339 or ms since the epoch).
        #[arg(long, value_parser = admin::parse_start, value_name = "earliest|latest|TIME")]
        start: Option<Start>,
    },
    /// List consumer groups.
    List,
    /// Show a group with lag and in-flight messages per queue.
    Describe { name: String },
    /// Change a group's settings.
    Update {
        name: String,
        #[arg(long, value_name = "true|false")]
        fifo: Option<bool>,
        #[arg(long)]
        max_attempts: Option<u32>,
        #[arg(long, value_parser = admin::parse_start, value_name = "earliest|latest|TIME")]
        start: Option<Start>,
    },
    /// Delete a consumer group.
    Delete { name: String },
    /// Move the group's position on every queue of a topic to a point in time.
    ResetOffset {
        name: String,
        #[arg(long)]
        topic: String,
        /// RFC 3339 time (2024-05-01T12:00:00Z) or milliseconds since the epoch.
        #[arg(long, value_parser = admin::parse_time_ms, value_name = "TIME")]
        to: i64,
    },
    /// Send the group's dead-lettered messages back to their topics.
    ResendDeadLetters {
        name: String,
        /// Most messages to re-send [default: 1000].
        #[arg(long)]
        max: Option<u32>,
    },
}

#[derive(Subcommand)]
enum MessageCommand {
    /// Show one message by id.
    Get {
        id: String,
        /// Body bytes to show [default: 1024].
        #[arg(long)]
        preview_bytes: Option<usize>,
    },
    /// List messages of a topic by key, or by queue and offset.
    List {
        topic: String,
        #[arg(long, conflicts_with_all = ["queue", "offset"], required_unless_present = "queue")]
        key: Option<String>,
        /// With --key: stored at or after this time.
        #[arg(long, requires = "key", value_parser = admin::parse_time_ms, value_name = "TIME")]
        begin: Option<i64>,
        /// With --key: stored at or before this time.
        #[arg(long, requires = "key", value_parser = admin::parse_time_ms, value_name = "TIME")]
        end: Option<i64>,
        #[arg(long)]
        queue: Option<u32>,
        /// With --queue: first offset [default: the oldest stored].
        #[arg(long, requires = "queue")]
        offset: Option<u64>,
        #[arg(long)]
        max: Option<u32>,
        #[arg(long)]
        preview_bytes: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client_cfg = client_config(&cli);
    match cli.command {
        Command::Server(args) => {
            let mut cfg = match args.load() {
                Ok(c) => c,
                Err(e) => return fail(&e, 2),
            };
            init_logging();
            server::set_transparent_huge_pages(cfg.server.transparent_huge_pages);
            server::fit_file_limit(&mut cfg);
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if cfg.server.worker_threads > 0 {
                builder.worker_threads(cfg.server.worker_threads as usize);
            }
            let rt = match builder.enable_all().thread_name("sluice").build() {
                Ok(rt) => rt,
                Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
            };
            match rt.block_on(server::serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "sluice failed");
                    fail(&format!("{e:#}"), 1)
                }
            }
        }
        Command::Config(ConfigCommand::Show(args)) => match args.server.load() {
            Ok(c) => {
                print!("{}", c.to_toml(args.show_secrets));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, 2),
        },
        Command::Send(args) => client_command(client_cfg, |c| async move {
            client_cmds::send(c, cli.json, args).await
        }),
        Command::Consume(args) => client_command(client_cfg, |c| async move {
            client_cmds::consume(c, cli.json, args).await
        }),
        Command::Bench(args) => {
            let admin = cli
                .admin
                .clone()
                .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned());
            let token = cli.admin_token.clone();
            client_command(client_cfg, |c| async move {
                bench::run(c, &admin, token.as_deref(), cli.json, args).await
            })
        }
        Command::Admin(command) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
            };
            let url = cli.admin.as_deref().unwrap_or(DEFAULT_ADMIN_URL);
            match rt.block_on(admin_command(
                url,
                cli.admin_token.as_deref(),
                cli.json,
                cli.namespace.as_deref().unwrap_or_default(),
                command,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}"), 1),
            }
        }
    }
}

/// The client settings of send, consume and bench from the global flags.
fn client_config(cli: &Cli) -> Result<sluice_client::ClientConfig, String> {
    let endpoint = cli
        .endpoint
        .clone()
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
    let mut c = sluice_client::ClientConfig::new(endpoint);
    if let Some(ns) = cli.namespace.as_deref().filter(|n| !n.is_empty()) {
        c = c.with_namespace(ns);
    }
    match (&cli.access_key, &cli.secret_key) {
        (Some(k), Some(s)) => c = c.with_credentials(k, s),
        (None, None) => {}
        _ => return Err("--access-key and --secret-key go together".into()),
    }
    Ok(c)
}

/// Runs a gRPC client command on a multi-threaded runtime.
fn client_command<F, Fut>(config: Result<sluice_client::ClientConfig, String>, f: F) -> ExitCode
where
    F: FnOnce(sluice_client::ClientConfig) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_client_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => return fail(&e, 2),
    };
    match rt.block_on(f(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}"), 1),
    }
}

/// Client commands log warnings only (RUST_LOG overrides).
fn init_client_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .from_env_lossy();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    // Colours only on a terminal, and never when NO_COLOR is set (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

async fn admin_command(
    url: &str,
    token: Option<&str>,
    json: bool,
    namespace: &str,
    command: AdminCommand,
) -> anyhow::Result<()> {
    sluice_proxy::namespace::check(namespace).map_err(|e| anyhow::anyhow!("--namespace: {e}"))?;
    let a = Admin::new(url, json, token)?.in_namespace(namespace);
    // Names on the command line are the namespace's (`orders` is `NAMESPACE%orders`).
    let ns = |name: String| sluice_proxy::namespace::wrap(namespace, &name);
    match command {
        AdminCommand::Status => a.status().await,
        AdminCommand::Topic(c) => match c {
            TopicCommand::Create { name, kind, queues } => {
                a.topic_create(CreateTopic {
                    name: ns(name),
                    message_type: kind.into(),
                    queues: queues.unwrap_or(sluice_admin::api::DEFAULT_QUEUES),
                })
                .await
            }
            TopicCommand::List => a.topic_list().await,
            TopicCommand::Describe { name } => a.topic_describe(&ns(name)).await,
            TopicCommand::Update { name, kind, queues } => {
                let req = UpdateTopic {
                    message_type: kind.map(Into::into),
                    queues,
                };
                a.topic_update(&ns(name), req).await
            }
            TopicCommand::Delete { name } => a.topic_delete(&ns(name)).await,
        },
        AdminCommand::Group(c) => match c {
            GroupCommand::Create {
                name,
                fifo,
                max_attempts,
                start,
            } => {
                a.group_create(CreateGroup {
                    name: ns(name),
                    fifo,
                    max_attempts,
                    backoff: None,
                    start,
                })
                .await
            }
            GroupCommand::List => a.group_list().await,
            GroupCommand::Describe { name } => a.group_describe(&ns(name)).await,
            GroupCommand::Update {
                name,
                fifo,
                max_attempts,
                start,
            } => {
                let req = UpdateGroup {
                    fifo,
                    max_attempts,
                    backoff: None,
                    start,
                };
                a.group_update(&ns(name), req).await
            }
            GroupCommand::Delete { name } => a.group_delete(&ns(name)).await,
            GroupCommand::ResetOffset { name, topic, to } => {
                let req = ResetOffset {
                    topic: ns(topic),
                    timestamp_ms: to,
                };
                a.group_reset_offset(&ns(name), req).await
            }
            GroupCommand::ResendDeadLetters { name, max } => {
                a.group_resend_dead_letters(&ns(name), ResendDeadLetters { max })
                    .await
            }
        },
        AdminCommand::Message(c) => match c {
            MessageCommand::Get { id, preview_bytes } => a.message_get(&id, preview_bytes).await,
            MessageCommand::List {
                topic,
                key,
                begin,
                end,
                queue,
                offset,
                max,
                preview_bytes,
            } => {
                let q = MessageQuery {
                    key,
                    begin_ms: begin,
                    end_ms: end,
                    queue,
                    offset,
                    max,
                    preview_bytes,
                };
                a.message_list(&ns(topic), q).await
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_documented_syntax() {
        for args in [
            &[
                "sluice",
                "server",
                "--config",
                "x.toml",
                "--data-dir",
                "d",
                "--listen",
                "127.0.0.1:1",
                "--admin-listen",
                "127.0.0.1:2",
                "--flush",
                "async",
            ][..],
            &["sluice", "config", "show", "--config", "x.toml"],
            &[
                "sluice", "topic", "create", "t", "--type", "fifo", "--queues", "4",
            ],
            &["sluice", "--json", "topic", "list"],
            &["sluice", "topic", "describe", "t", "--admin", "http://h:1"],
            &[
                "sluice", "topic", "update", "t", "--type", "delay", "--queues", "9",
            ],
            &["sluice", "topic", "delete", "t"],
            &[
                "sluice",
                "group",
                "create",
                "g",
                "--fifo",
                "--max-attempts",
                "3",
                "--start",
                "earliest",
            ],
            &["sluice", "group", "create", "g", "--start", "1700000000000"],
            &["sluice", "group", "list"],
            &["sluice", "group", "describe", "g", "--json"],
            &["sluice", "group", "delete", "g"],
            &[
                "sluice",
                "group",
                "reset-offset",
                "g",
                "--topic",
                "t",
                "--to",
                "2024-05-01T12:00:00Z",
            ],
            &[
                "sluice",
                "group",
                "reset-offset",
                "g",
                "--topic",
                "t",
                "--to",
                "1700000000000",
            ],
            &["sluice", "group", "resend-dead-letters", "g"],
            &["sluice", "message", "get", "ID"],
            &["sluice", "message", "list", "t", "--key", "k"],
            &[
                "sluice", "message", "list", "t", "--queue", "0", "--offset", "5",
            ],
            &["sluice", "status"],
            &[
                "sluice", "send", "t", "hello", "--tag", "a", "--key", "k1", "--key", "k2",
            ],
            &[
                "sluice",
                "--endpoint",
                "h:1",
                "send",
                "t",
                "--file",
                "f",
                "--property",
                "a=1",
                "--delay",
                "10s",
                "--count",
                "3",
            ],
            &["sluice", "send", "t", "x", "--group", "g1", "--json"],
            &[
                "sluice",
                "send",
                "t",
                "x",
                "--deliver-at",
                "2030-01-01T00:00:00Z",
            ],
            &["sluice", "consume", "t", "--group", "g"],
            &[
                "sluice",
                "consume",
                "t",
                "--group",
                "g",
                "--filter",
                "a||b",
                "--max",
                "5",
                "--follow",
                "--no-ack",
                "--invisible",
                "1m",
            ],
            &[
                "sluice", "consume", "t", "--group", "g", "--sql", "a > 1", "--json",
            ],
            &["sluice", "bench"],
            &[
                "sluice",
                "bench",
                "--endpoint",
                "h:1",
                "--admin",
                "http://h:2",
                "--create",
                "--topics",
                "2",
                "--queues",
                "16",
                "--producers",
                "2",
                "--consumers",
                "2",
                "--consumer-mode",
                "push",
                "--size",
                "1KiB",
                "--batch",
                "10",
                "--rate",
                "max",
                "--duration",
                "30s",
                "--warmup",
                "10s",
                "--flush-note",
                "sync flush",
                "--json-out",
                "r.json",
            ],
        ] {
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
        for args in [
            &["sluice", "topic", "create", "t"][..],
            &["sluice", "topic", "create", "t", "--type", "bogus"],
            &[
                "sluice",
                "group",
                "reset-offset",
                "g",
                "--topic",
                "t",
                "--to",
                "soon",
            ],
            &["sluice", "message", "list", "t"],
            &[
                "sluice", "message", "list", "t", "--key", "k", "--queue", "1",
            ],
            &["sluice", "server", "--listen", "nowhere"],
            &["sluice", "send", "t", "x", "--file", "f"],
            &[
                "sluice",
                "send",
                "t",
                "x",
                "--delay",
                "10s",
                "--deliver-at",
                "2030-01-01T00:00:00Z",
            ],
            &["sluice", "send", "t", "x", "--group", "g", "--delay", "1s"],
            &["sluice", "send", "t", "x", "--property", "novalue"],
            &["sluice", "consume", "t"],
            &[
                "sluice", "consume", "t", "--group", "g", "--filter", "a", "--sql", "b",
            ],
            &["sluice", "bench", "--rate", "fast"],
        ] {
            assert!(
                Cli::try_parse_from(args).is_err(),
                "{args:?} should not parse"
            );
        }
    }
}
