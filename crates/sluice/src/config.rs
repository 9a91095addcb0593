//! Configuration of `sluice server`.
//!
//! Layers, later ones winning key by key:
//!
//! 1. the repository's commented `sluice.toml`, embedded at build time: it *is* the
//!    defaults (a test keeps it equal to [`Config::default`]);
//! 2. the file given with `--config`;
//! 3. environment variables: `SLUICE_<KEY>` for keys of `[server]` (`SLUICE_DATA_DIR`,
//!    `SLUICE_LISTEN`, `SLUICE_ADMIN_LISTEN`) and `SLUICE_<SECTION>__<KEY>` for the others
//!    (`SLUICE_STORE__SEGMENT_SIZE=512MiB`); see [`env_var`];
//! 4. command-line flags ([`Overrides`]).
//!
//! Parsing is strict and reports every problem at once: each key is parsed on its own, so
//! an unknown key, a bad unit and a wrong type in the same file all show up in one error
//! list, each naming its source and key. (A derived `Deserialize` with
//! `deny_unknown_fields` names unknown keys too, but stops at the first error.) The schema
//! is declared once with [`section!`], which generates the struct, its defaults, its key
//! list (used by the docs test and the environment mapping) and the per-key parser.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_broker::{BrokerConfig, TransactionResolution};
use sluice_common::{parse_bytes, parse_duration};
use sluice_proxy::ProxyConfig;
use sluice_store::{FlushPolicy, StoreConfig};

/// The shipped `sluice.toml`: the built-in defaults.
pub const DEFAULT_TOML: &str = include_str!("../../../sluice.toml");

/// Environment variables starting with `SLUICE_` that are not server settings.
const NON_CONFIG_ENV: &[&str] = &["SLUICE_ADMIN"];

// ---------------------------------------------------------------------------- value types

/// A byte count written with a unit: `512`, `64KiB`, `1GiB`, `10MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    /// The largest unit that represents the value exactly, so output parses back unchanged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n == 0 {
            return f.write_str("0");
        }
        const UNITS: [(&str, u64); 7] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
        ];
        match UNITS.iter().find(|(_, m)| n.is_multiple_of(*m)) {
            Some((unit, m)) => write!(f, "{}{unit}", n / m),
            None => write!(f, "{n}"),
        }
    }
}

/// A duration written with a unit: `20us`, `250ms`, `30s`, `5m`, `2h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        if us == 0 {
            return f.write_str("0s");
        }
        const UNITS: [(&str, u128); 5] = [
            ("h", 3_600_000_000),
            ("m", 60_000_000),
            ("s", 1_000_000),
            ("ms", 1_000),
            ("us", 1),
        ];
        let (unit, m) = UNITS
            .iter()
            .find(|(_, m)| us.is_multiple_of(*m))
            .copied()
            .unwrap_or(("us", 1));
        write!(f, "{}{unit}", us / m)
    }
}

/// When an appended message counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlushMode {
    /// After `fdatasync` (group commit): survives a power loss.
    Sync,
    /// Once in the page cache; flushed in the background.
    Async,
}

impl FlushMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushMode::Sync => "sync",
            FlushMode::Async => "async",
        }
    }
}

/// A type a configuration key can have.
trait Setting: Sized {
    /// Parses a value from a TOML file; environment variables and flags arrive as strings.
    fn parse(v: &toml::Value) -> Result<Self, String>;
    /// The value as written in a configuration file.
    fn render(&self) -> toml::Value;
}

fn expect_str<'a>(v: &'a toml::Value, what: &str) -> Result<&'a str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected {what} as a string, found {}", v.type_str()))
}

impl Setting for String {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        let s = expect_str(v, "text")?;
        if s.trim().is_empty() {
            return Err("must not be empty".into());
        }
        Ok(s.to_owned())
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.clone())
    }
}

impl Setting for PathBuf {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        String::parse(v).map(PathBuf::from)
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.display().to_string())
    }
}

impl Setting for SocketAddr {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        let s = expect_str(v, "an address like \"127.0.0.1:8081\"")?;
        s.trim().parse().map_err(|_| {
            format!("{s:?} is not an address like \"127.0.0.1:8081\" or \"[::]:8081\"")
        })
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.to_string())
    }
}

/// Whole-number settings: a TOML integer or a string of one (environment overrides are
/// strings), within the type's range.
macro_rules! int_setting {
    ($($t:ty),*) => {$(
        impl Setting for $t {
            fn parse(v: &toml::Value) -> Result<Self, String> {
                let n = match v {
                    toml::Value::Integer(i) => <$t>::try_from(*i).ok(),
                    toml::Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                };
                n.ok_or_else(|| {
                    format!(
                        "expected a whole number from {} to {}, found {v}",
                        <$t>::MIN,
                        <$t>::MAX
                    )
                })
            }
            fn render(&self) -> toml::Value {
                toml::Value::Integer(i64::from(*self))
            }
        }
    )*};
}

int_setting!(u32, i32);

impl Setting for bool {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Boolean(b) => Ok(*b),
            toml::Value::String(s) if s.trim() == "true" => Ok(true),
            toml::Value::String(s) if s.trim() == "false" => Ok(false),
            _ => Err(format!("expected true or false, found {v}")),
        }
    }
    fn render(&self) -> toml::Value {
        toml::Value::Boolean(*self)
    }
}

impl Setting for ByteSize {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(i) => u64::try_from(*i)
                .map(ByteSize)
                .map_err(|_| format!("a size cannot be negative ({i})")),
            toml::Value::String(s) => parse_bytes(s).map(ByteSize).map_err(|e| e.to_string()),
            other => Err(format!(
                "expected a size like \"64MiB\", found {}",
                other.type_str()
            )),
        }
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.to_string())
    }
}

impl Setting for HumanDuration {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        let s = expect_str(v, "a duration like \"30s\"")?;
        parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| e.to_string())
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.to_string())
    }
}

/// Optional values are switched off with `"off"`.
impl<T: Setting> Setting for Option<T> {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        if v.as_str()
            .is_some_and(|s| s.trim().eq_ignore_ascii_case("off"))
        {
            return Ok(None);
        }
        T::parse(v)
            .map(Some)
            .map_err(|e| format!("{e} (or \"off\")"))
    }
    fn render(&self) -> toml::Value {
        match self {
            Some(v) => v.render(),
            None => toml::Value::String("off".into()),
        }
    }
}

impl Setting for FlushMode {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        match expect_str(v, "\"sync\" or \"async\"")?.trim() {
            "sync" => Ok(FlushMode::Sync),
            "async" => Ok(FlushMode::Async),
            other => Err(format!("{other:?} is neither \"sync\" nor \"async\"")),
        }
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.as_str().into())
    }
}

impl Setting for TransactionResolution {
    fn parse(v: &toml::Value) -> Result<Self, String> {
        let s = expect_str(v, "\"commit\" or \"rollback\"")?;
        TransactionResolution::parse(s)
            .ok_or_else(|| format!("{s:?} is neither \"commit\" nor \"rollback\""))
    }
    fn render(&self) -> toml::Value {
        toml::Value::String(self.as_str().into())
    }
}

// -------------------------------------------------------------------------------- schema

/// One `[section]` of the file.
trait Section {
    const NAME: &'static str;
    const KEYS: &'static [&'static str];
    /// Sets `key`; `None` when the section has no such key.
    fn set(&mut self, key: &str, v: &toml::Value) -> Option<Result<(), String>>;
    /// Every key with its value, in declaration order.
    fn entries(&self) -> Vec<(&'static str, toml::Value)>;
}

/// Declares a section: its struct with documented fields, defaults, keys and parser.
macro_rules! section {
    (
        $(#[$meta:meta])*
        $name:ident = $section:literal {
            $( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        impl Section for $name {
            const NAME: &'static str = $section;
            const KEYS: &'static [&'static str] = &[$( stringify!($field) ),*];

            fn set(&mut self, key: &str, v: &toml::Value) -> Option<Result<(), String>> {
                match key {
                    $( stringify!($field) => {
                        Some(<$ty as Setting>::parse(v).map(|x| self.$field = x))
                    } )*
                    _ => None,
                }
            }

            fn entries(&self) -> Vec<(&'static str, toml::Value)> {
                vec![$( (stringify!($field), Setting::render(&self.$field)) ),*]
            }
        }
    };
}

/// Settings `sluice config show` hides unless asked: (section, key).
const SECRETS: &[(&str, &str)] = &[("server", "admin_token")];

fn lib_store() -> StoreConfig {
    StoreConfig::new("")
}

fn lib_broker() -> BrokerConfig {
    BrokerConfig::new("")
}

section! {
    /// `[server]`: where the broker keeps its data and listens.
    ServerSettings = "server" {
        /// Directory of the commit log, consume queues, indexes and metadata.
        data_dir: PathBuf = PathBuf::from("./sluice-data"),
        /// Address of the gRPC endpoint for RocketMQ 5 clients.
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8081)),
        /// Address of the admin HTTP API.
        admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
        /// Threads that run network and broker work; 0 means one per CPU core.
        worker_threads: u32 = 0,
        /// Transparent huge pages for the server's memory; off by default (their faults and
        /// the compaction behind them stalled the runtime for 10–30 ms at a time).
        transparent_huge_pages: bool = false,
        /// Bearer token the admin API's `/api/` requests must carry; `off`: none.
        admin_token: Option<String> = None,
    }
}

section! {
    /// `[store]`: the commit log and its durability.
    StoreSettings = "store" {
        /// `sync`: an append completes after fdatasync; `async`: once in the page cache.
        flush: FlushMode = FlushMode::Sync,
        /// Async flush: longest time written data waits for a flush.
        flush_interval: HumanDuration = HumanDuration(Duration::from_millis(500)),
        /// Async flush: unflushed bytes that trigger a flush early.
        flush_bytes: ByteSize = ByteSize(4 << 20),
        /// Size of one commit-log segment file.
        segment_size: ByteSize = ByteSize(lib_store().segment_size),
        /// Largest stored record (body, properties and headers).
        max_message_size: ByteSize = ByteSize(u64::from(lib_store().max_record_size)),
        /// Segments whose messages are all older than this are deleted; `off` keeps them.
        retention: Option<HumanDuration> = lib_store().retention.map(HumanDuration),
        /// Oldest segments are deleted while the commit log is larger; `off` for no cap.
        disk_budget: Option<ByteSize> = lib_store().disk_budget.map(ByteSize),
        /// Appends are refused while the disk has less free space.
        min_free_space: ByteSize = ByteSize(lib_store().min_free_space),
        /// How often recovery checkpoints are written.
        checkpoint_interval: HumanDuration = HumanDuration(lib_store().checkpoint_interval),
        /// Sync flush: longest wait for appenders expected back before a smaller group commit.
        group_commit_wait: HumanDuration = HumanDuration(lib_store().group_commit_wait),
        /// Sync flush: bytes kept zero-filled in front of the writer; `0B` turns it off.
        zero_ahead: ByteSize = ByteSize(lib_store().zero_ahead),
        /// Sync flush: group commits of at most this many appends are synced by the writer
        /// thread itself while the syncer is idle; `0` hands every one to the syncer.
        inline_sync_max: u32 = u32::try_from(lib_store().inline_sync_max).unwrap_or(u32::MAX),
        /// Sync flush: after a group commit it synced itself, how long the writer thread
        /// polls for the next append before it sleeps; `0s` sleeps at once.
        inline_sync_spin: HumanDuration = HumanDuration(lib_store().inline_sync_spin),
        /// Consume-queue files kept open at once; the least recently used are closed.
        open_queue_files: u32 = u32::try_from(lib_store().open_queue_files).unwrap_or(u32::MAX),
        /// Sync flush: nice value of the syncer thread; negative needs CAP_SYS_NICE.
        syncer_nice: i32 = lib_store().syncer_nice,
    }
}

section! {
    /// `[broker]`: message limits and background upkeep.
    BrokerSettings = "broker" {
        /// Name announced to clients in routes.
        name: String = lib_broker().broker_name,
        /// Largest message body accepted.
        max_body_size: ByteSize = ByteSize(lib_broker().max_body_size as u64),
        /// Most user properties per message.
        max_properties: u32 = lib_broker().max_properties as u32,
        /// How often the consumption (POP) state is snapshotted.
        pop_snapshot_interval: HumanDuration = HumanDuration(lib_broker().pop_snapshot_interval),
        /// How often retention looks for segments to delete.
        retention_check_interval: HumanDuration = HumanDuration(lib_broker().retention_interval),
        /// A transaction not ended for this long is checked with its producer, and again
        /// after each further interval.
        transaction_check_interval: HumanDuration = HumanDuration(lib_broker().transaction_check_interval),
        /// Unanswered checks before the default resolution is applied.
        transaction_max_checks: u32 = lib_broker().transaction_max_checks,
        /// What happens to a transaction after the last unanswered check.
        transaction_default_resolution: TransactionResolution = lib_broker().transaction_default_resolution,
        /// Latest delivery time accepted for a delay message, from now.
        max_delay: HumanDuration = HumanDuration(lib_broker().max_delay),
        /// Longest sleep of the delay-message timer between runs.
        timer_tick: HumanDuration = HumanDuration(lib_broker().timer.tick),
        /// How often the timer's progress is checkpointed.
        timer_checkpoint_interval: HumanDuration = HumanDuration(lib_broker().timer.checkpoint_interval),
        /// Pending delay messages older than this are copied forward in the log.
        timer_roll_window: HumanDuration = HumanDuration(lib_broker().timer.roll_window),
    }
}

section! {
    /// `[proxy]`: the gRPC access point.
    ProxySettings = "proxy" {
        /// Longest a receive waits for messages to arrive.
        max_long_poll: HumanDuration = HumanDuration(ProxyConfig::default().max_long_poll),
        /// Invisible time of messages handed to push consumers, renewed while processed.
        auto_renew_invisible: HumanDuration = HumanDuration(ProxyConfig::default().auto_renew_invisible),
        /// Client connections open at once; further ones are closed at accept.
        max_connections: u32 = ProxyConfig::default().max_connections as u32,
        /// Time a new connection has to start HTTP/2 before it is closed.
        handshake_timeout: HumanDuration = HumanDuration(ProxyConfig::default().handshake_timeout),
        /// Users and permissions (TOML); requests must then be signed; `off`: no authentication.
        acl_file: Option<PathBuf> = None,
    }
}

/// The whole configuration of `sluice server`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub server: ServerSettings,
    pub store: StoreSettings,
    pub broker: BrokerSettings,
    pub proxy: ProxySettings,
}

/// Values given as command-line flags; they win over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub flush: Option<FlushMode>,
}

/// Every problem found, each naming where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and parses an ACL file (`[proxy] acl_file`).
pub fn load_acl(path: &Path) -> Result<sluice_proxy::auth::Acl, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    sluice_proxy::auth::Acl::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The environment variable of a key.
pub fn env_var(section: &str, key: &str) -> String {
    if section == ServerSettings::NAME {
        format!("SLUICE_{}", key.to_ascii_uppercase())
    } else {
        format!(
            "SLUICE_{}__{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        )
    }
}

impl Config {
    /// Every section with its keys, in file order.
    pub const SCHEMA: &'static [(&'static str, &'static [&'static str])] = &[
        (ServerSettings::NAME, ServerSettings::KEYS),
        (StoreSettings::NAME, StoreSettings::KEYS),
        (BrokerSettings::NAME, BrokerSettings::KEYS),
        (ProxySettings::NAME, ProxySettings::KEYS),
    ];

    /// Loads the configuration: defaults ← `file` ← `env` ← `flags`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (OsString, OsString)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        let mut cfg = Config::default();
        let mut errors = Vec::new();
        cfg.apply_toml(DEFAULT_TOML, "built-in sluice.toml", &mut errors);
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => cfg.apply_toml(&text, &path.display().to_string(), &mut errors),
                Err(e) => errors.push(format!("cannot read {}: {e}", path.display())),
            }
        }
        cfg.apply_env(env, &mut errors);
        cfg.apply_flags(flags);
        cfg.validate(&mut errors);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn set(&mut self, section: &str, key: &str, v: &toml::Value) -> Option<Result<(), String>> {
        match section {
            ServerSettings::NAME => self.server.set(key, v),
            StoreSettings::NAME => self.store.set(key, v),
            BrokerSettings::NAME => self.broker.set(key, v),
            ProxySettings::NAME => self.proxy.set(key, v),
            _ => None,
        }
    }

    fn keys_of(section: &str) -> Option<&'static [&'static str]> {
        Self::SCHEMA
            .iter()
            .find(|(s, _)| *s == section)
            .map(|(_, k)| *k)
    }

    fn apply_toml(&mut self, text: &str, origin: &str, errors: &mut Vec<String>) {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{origin}: {}", e.to_string().trim_end()));
                return;
            }
        };
        let sections: Vec<&str> = Self::SCHEMA.iter().map(|(s, _)| *s).collect();
        for (section, value) in &table {
            let Some(keys) = Self::keys_of(section) else {
                let hint = if value.is_table() {
                    String::new()
                } else {
                    Self::SCHEMA
                        .iter()
                        .find(|(_, k)| k.contains(&section.as_str()))
                        .map(|(s, _)| format!("; did you mean `{section}` under [{s}]?"))
                        .unwrap_or_default()
                };
                errors.push(format!(
                    "{origin}: unknown {} `{section}` (sections are {}){hint}",
                    if value.is_table() { "section" } else { "key" },
                    sections.join(", ")
                ));
                continue;
            };
            let Some(entries) = value.as_table() else {
                errors.push(format!(
                    "{origin}: `{section}` must be a section ([{section}]), not a {}",
                    value.type_str()
                ));
                continue;
            };
            for (key, v) in entries {
                match self.set(section, key, v) {
                    None => errors.push(format!(
                        "{origin}: unknown key `{key}` in [{section}] (keys are {})",
                        keys.join(", ")
                    )),
                    Some(Err(e)) => errors.push(format!("{origin}: [{section}] {key}: {e}")),
                    Some(Ok(())) => {}
                }
            }
        }
    }

    fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (OsString, OsString)>,
        errors: &mut Vec<String>,
    ) {
        let known: Vec<(String, &str, &str)> = Self::SCHEMA
            .iter()
            .flat_map(|(s, keys)| keys.iter().map(move |k| (env_var(s, k), *s, *k)))
            .collect();
        let mut vars: Vec<(String, OsString)> = env
            .into_iter()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
            .filter(|(k, _)| k.starts_with("SLUICE_") && !NON_CONFIG_ENV.contains(&k.as_str()))
            .collect();
        // Deterministic error order whatever order the environment comes in.
        vars.sort();
        for (name, value) in vars {
            let Some((_, section, key)) = known.iter().find(|(n, _, _)| *n == name) else {
                // Only names shaped like a nested setting are checked strictly; other
                // SLUICE_* variables belong to scripts and tools (SLUICE_BIN, …).
                if !name.contains("__") {
                    continue;
                }
                errors.push(format!(
                    "environment: unknown variable {name} (settings are SLUICE_<KEY> for [server] \
                     keys and SLUICE_<SECTION>__<KEY> for the others, e.g. SLUICE_STORE__FLUSH)"
                ));
                continue;
            };
            let Ok(value) = value.into_string() else {
                errors.push(format!("environment: {name} is not valid UTF-8"));
                continue;
            };
            if let Some(Err(e)) = self.set(section, key, &toml::Value::String(value)) {
                errors.push(format!("environment: {name} ([{section}] {key}): {e}"));
            }
        }
    }

    fn apply_flags(&mut self, flags: &Overrides) {
        if let Some(d) = &flags.data_dir {
            self.server.data_dir = d.clone();
        }
        if let Some(a) = flags.listen {
            self.server.listen = a;
        }
        if let Some(a) = flags.admin_listen {
            self.server.admin_listen = a;
        }
        if let Some(f) = flags.flush {
            self.store.flush = f;
        }
    }

    /// Checks that need more than one key, or ranges the types cannot express.
    fn validate(&self, errors: &mut Vec<String>) {
        let mut bad = |key: &str, msg: String| errors.push(format!("{key}: {msg}"));
        let (st, br, px, sv) = (&self.store, &self.broker, &self.proxy, &self.server);
        if sv.listen == sv.admin_listen && sv.listen.port() != 0 {
            bad(
                "[server] admin_listen",
                format!("{} is also the gRPC listen address", sv.admin_listen),
            );
        }
        if sv.worker_threads > 1024 {
            bad(
                "[server] worker_threads",
                format!("{} is more than 1024", sv.worker_threads),
            );
        }
        if st.segment_size.0 < 1 << 20 {
            bad("[store] segment_size", "must be at least 1MiB".into());
        }
        if st.max_message_size.0 > u64::from(u32::MAX) {
            bad("[store] max_message_size", "must be below 4GiB".into());
        }
        if st.max_message_size > st.segment_size {
            bad(
                "[store] max_message_size",
                format!(
                    "{} exceeds segment_size {}",
                    st.max_message_size, st.segment_size
                ),
            );
        }
        if st.max_message_size <= br.max_body_size {
            bad(
                "[store] max_message_size",
                format!(
                    "{} must exceed [broker] max_body_size {} to leave room for properties",
                    st.max_message_size, br.max_body_size
                ),
            );
        }
        if st.flush_bytes.0 == 0 {
            bad("[store] flush_bytes", "must be positive".into());
        }
        if st.retention.is_some_and(|r| r.0.is_zero()) {
            bad(
                "[store] retention",
                "must be positive; \"off\" keeps messages until disk_budget needs room".into(),
            );
        }
        if st.inline_sync_spin.0 > Duration::from_millis(1) {
            bad(
                "[store] inline_sync_spin",
                "must be at most 1ms: the writer spends up to this much of a core after every \
                 group commit it syncs itself"
                    .into(),
            );
        }
        if !(-20..=19).contains(&st.syncer_nice) {
            bad(
                "[store] syncer_nice",
                "must be between -20 and 19 (a Linux nice value)".into(),
            );
        }
        if st.open_queue_files < 16 {
            bad(
                "[store] open_queue_files",
                "must be at least 16: fewer would reopen queue files on almost every write".into(),
            );
        }
        if st.disk_budget.is_some_and(|b| b < st.segment_size) {
            bad(
                "[store] disk_budget",
                "must be at least one segment_size".into(),
            );
        }
        // Periods of background work: at least a millisecond (durations may be written in
        // microseconds, for `inline_sync_spin`; "1us" here would make these loops spin).
        for (key, d) in [
            ("[store] flush_interval", st.flush_interval),
            ("[store] checkpoint_interval", st.checkpoint_interval),
            ("[broker] pop_snapshot_interval", br.pop_snapshot_interval),
            (
                "[broker] retention_check_interval",
                br.retention_check_interval,
            ),
            (
                "[broker] transaction_check_interval",
                br.transaction_check_interval,
            ),
            ("[broker] max_delay", br.max_delay),
            ("[broker] timer_tick", br.timer_tick),
            (
                "[broker] timer_checkpoint_interval",
                br.timer_checkpoint_interval,
            ),
            ("[proxy] handshake_timeout", px.handshake_timeout),
        ] {
            if d.0 < Duration::from_millis(1) {
                bad(key, "must be at least 1ms".into());
            }
        }
        if br.timer_roll_window.0 < Duration::from_secs(60) {
            bad("[broker] timer_roll_window", "must be at least 1m".into());
        }
        if px.max_connections == 0 {
            bad("[proxy] max_connections", "must be positive".into());
        }
        if br.max_body_size.0 == 0 {
            bad("[broker] max_body_size", "must be positive".into());
        }
        if let Some(path) = &px.acl_file {
            if let Err(e) = load_acl(path) {
                bad("[proxy] acl_file", e);
            }
        }
        let lib = lib_broker();
        if px.auto_renew_invisible.0 < lib.min_invisible
            || px.auto_renew_invisible.0 > lib.max_invisible
        {
            bad(
                "[proxy] auto_renew_invisible",
                format!(
                    "must be between {} and {}",
                    HumanDuration(lib.min_invisible),
                    HumanDuration(lib.max_invisible)
                ),
            );
        }
    }

    /// Settings of the store.
    pub fn store_config(&self) -> StoreConfig {
        let s = &self.store;
        StoreConfig {
            segment_size: s.segment_size.0,
            flush: match s.flush {
                FlushMode::Sync => FlushPolicy::Sync,
                FlushMode::Async => FlushPolicy::Async {
                    interval: s.flush_interval.0,
                    bytes: s.flush_bytes.0,
                },
            },
            max_record_size: u32::try_from(s.max_message_size.0).unwrap_or(u32::MAX),
            retention: s.retention.map(|d| d.0),
            disk_budget: s.disk_budget.map(|b| b.0),
            min_free_space: s.min_free_space.0,
            checkpoint_interval: s.checkpoint_interval.0,
            group_commit_wait: s.group_commit_wait.0,
            zero_ahead: s.zero_ahead.0,
            inline_sync_max: s.inline_sync_max as usize,
            inline_sync_spin: s.inline_sync_spin.0,
            open_queue_files: s.open_queue_files as usize,
            syncer_nice: s.syncer_nice,
            ..StoreConfig::new(&self.server.data_dir)
        }
    }

    /// Settings of the broker.
    pub fn broker_config(&self) -> BrokerConfig {
        let b = &self.broker;
        BrokerConfig {
            broker_name: b.name.clone(),
            max_body_size: usize::try_from(b.max_body_size.0).unwrap_or(usize::MAX),
            max_properties: b.max_properties as usize,
            pop_snapshot_interval: b.pop_snapshot_interval.0,
            retention_interval: b.retention_check_interval.0,
            transaction_check_interval: b.transaction_check_interval.0,
            transaction_max_checks: b.transaction_max_checks,
            transaction_default_resolution: b.transaction_default_resolution,
            max_delay: b.max_delay.0,
            timer: sluice_broker::timer::TimerConfig {
                tick: b.timer_tick.0,
                checkpoint_interval: b.timer_checkpoint_interval.0,
                roll_window: b.timer_roll_window.0,
            },
            ..BrokerConfig::new(&self.server.data_dir)
        }
    }

    /// Settings of the gRPC access point (reads the ACL file, if one is configured).
    pub fn proxy_config(&self) -> Result<ProxyConfig, String> {
        let d = ProxyConfig::default();
        let body = usize::try_from(self.broker.max_body_size.0).unwrap_or(usize::MAX);
        let acl = match &self.proxy.acl_file {
            Some(path) => Some(std::sync::Arc::new(sluice_proxy::auth::SharedAcl::new(
                load_acl(path)?,
            ))),
            None => None,
        };
        Ok(ProxyConfig {
            max_body_size: body,
            max_long_poll: self.proxy.max_long_poll.0,
            auto_renew_invisible: self.proxy.auto_renew_invisible.0,
            max_connections: self.proxy.max_connections as usize,
            handshake_timeout: self.proxy.handshake_timeout.0,
            // Room for the body plus properties and framing.
            max_decoding_message_size: d
                .max_decoding_message_size
                .max(body.saturating_add(1 << 20)),
            acl,
        })
    }

    /// The effective configuration as TOML, in file order; with `show_secrets` it loads back
    /// unchanged. Without it, a secret that is set (see `SECRETS`) is printed as a comment
    /// saying so, so a shown configuration pasted into a ticket or a log leaks nothing.
    pub fn to_toml(&self, show_secrets: bool) -> String {
        let sections = [
            (ServerSettings::NAME, self.server.entries()),
            (StoreSettings::NAME, self.store.entries()),
            (BrokerSettings::NAME, self.broker.entries()),
            (ProxySettings::NAME, self.proxy.entries()),
        ];
        let mut out = String::new();
        for (i, (name, entries)) in sections.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&format!("[{name}]\n"));
            for (key, value) in entries {
                let secret = SECRETS.contains(&(*name, *key));
                if secret && !show_secrets && value.as_str() != Some("off") {
                    out.push_str(&format!(
                        "# {key} = (set, hidden; --show-secrets prints it)\n"
                    ));
                } else {
                    out.push_str(&format!("{key} = {value}\n"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn load_str(file: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, file).expect("write");
        Config::load(Some(&path), env(vars), &Overrides::default())
    }

    fn errors(r: Result<Config, ConfigErrors>) -> Vec<String> {
        match r {
            Ok(c) => panic!("expected errors, loaded {c:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn shipped_file_is_the_defaults() {
        let mut cfg = Config::default();
        let mut errs = Vec::new();
        cfg.apply_toml(DEFAULT_TOML, "sluice.toml", &mut errs);
        assert!(errs.is_empty(), "{errs:#?}");
        assert_eq!(cfg, Config::default());
        // Every key is present in the file, so it documents all of them.
        let table: toml::Table = DEFAULT_TOML.parse().expect("parses");
        for (section, keys) in Config::SCHEMA {
            let t = table.get(*section).and_then(|v| v.as_table());
            for key in *keys {
                assert!(
                    t.is_some_and(|t| t.contains_key(*key)),
                    "sluice.toml lacks [{section}] {key}"
                );
            }
        }
        let loaded = Config::load(None, env(&[]), &Overrides::default()).expect("loads");
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn shipped_file_comments_every_key() {
        let mut prev = "";
        for line in DEFAULT_TOML.lines() {
            let l = line.trim();
            if !l.is_empty() && !l.starts_with('#') && !l.starts_with('[') {
                assert!(
                    prev.starts_with('#'),
                    "no comment above {l:?} in sluice.toml"
                );
            }
            prev = l;
        }
    }

    #[test]
    fn defaults_match_the_libraries() {
        let c = Config::default();
        let s = c.store_config();
        let lib = StoreConfig::new(&c.server.data_dir);
        assert_eq!(
            (
                s.segment_size,
                s.max_record_size,
                s.retention,
                s.min_free_space
            ),
            (
                lib.segment_size,
                lib.max_record_size,
                lib.retention,
                lib.min_free_space
            )
        );
        assert_eq!(s.flush, FlushPolicy::Sync);
        let b = c.broker_config();
        let lib = BrokerConfig::new(&c.server.data_dir);
        assert_eq!(
            (b.max_body_size, b.max_properties, b.broker_name),
            (lib.max_body_size, lib.max_properties, lib.broker_name)
        );
        assert_eq!(c.server.data_dir, PathBuf::from("./sluice-data"));
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.worker_threads, 0);
    }

    #[test]
    fn file_overrides_defaults() {
        let c = load_str(
            "[store]\nflush = \"async\"\nflush_interval = \"250ms\"\nsegment_size = \"64MiB\"\n\
             retention = \"off\"\ndisk_budget = \"10GiB\"\n[broker]\nmax_properties = 64\n",
            &[],
        )
        .expect("loads");
        assert_eq!(c.store.flush, FlushMode::Async);
        assert_eq!(c.store.segment_size, ByteSize(64 << 20));
        assert_eq!(c.store.retention, None);
        assert_eq!(c.store.disk_budget, Some(ByteSize(10 << 30)));
        assert_eq!(c.broker.max_properties, 64);
        assert_eq!(
            c.store_config().flush,
            FlushPolicy::Async {
                interval: Duration::from_millis(250),
                bytes: 4 << 20
            }
        );
        // Untouched keys keep their defaults.
        assert_eq!(c.server, ServerSettings::default());
    }

    #[test]
    fn acl_file_is_read_and_checked_at_load() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let good = dir.path().join("acl.toml");
        std::fs::write(
            &good,
            "[[users]]\naccess_key = \"a\"\nsecret_key = \"s\"\npublish = [\"*\"]\n",
        )?;
        let c = load_str(
            "",
            &[("SLUICE_PROXY__ACL_FILE", &good.display().to_string())],
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let acl = c.proxy_config().map_err(anyhow::Error::msg)?.acl;
        assert_eq!(acl.map(|a| a.current().len()), Some(1));
        assert!(
            Config::default()
                .proxy_config()
                .map_err(anyhow::Error::msg)?
                .acl
                .is_none()
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[[users]]\naccess_key = \"a\"\n")?;
        let missing = dir.path().join("missing.toml");
        for (path, says) in [(&bad, "secret_key"), (&missing, "cannot read")] {
            let file = format!("[proxy]\nacl_file = {:?}\n", path.display().to_string());
            let errs = errors(load_str(&file, &[]));
            assert_eq!(errs.len(), 1, "{errs:#?}");
            assert!(
                errs[0].contains("[proxy] acl_file") && errs[0].contains(says),
                "{errs:#?}"
            );
        }
        Ok(())
    }

    #[test]
    fn unknown_keys_are_named() {
        let errs = errors(load_str(
            "listen = \"1.2.3.4:5\"\n[store]\nsegmnt_size = \"1GiB\"\n[stor]\nx = 1\n",
            &[],
        ));
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("unknown key `segmnt_size` in [store]")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("unknown section `stor`")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("unknown key `listen`") && e.contains("[server]")),
            "{errs:#?}"
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = errors(load_str(
            "[server]\nlisten = \"nowhere\"\n[store]\nsegment_size = \"1GB2\"\nflush = \"maybe\"\n\
             bogus = 1\n[broker]\nmax_properties = -3\npop_snapshot_interval = 30\n",
            &[
                ("SLUICE_PROXY__MAX_LONG_POLL", "soon"),
                ("SLUICE_STORE__NOPE", "1"),
                ("SLUICE_BIN", "ignored"),
            ],
        ));
        for needle in [
            "[server] listen",
            "[store] segment_size",
            "\"1GB2\" is not a size",
            "[store] flush",
            "`bogus`",
            "[broker] max_properties",
            "[broker] pop_snapshot_interval",
            "SLUICE_PROXY__MAX_LONG_POLL",
            "\"soon\" is not a duration",
            "SLUICE_STORE__NOPE",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 8, "{errs:#?}");
        let shown = ConfigErrors(errs).to_string();
        assert!(
            shown.starts_with("invalid configuration (8 problems)"),
            "{shown}"
        );
    }

    #[test]
    fn bad_units_are_explained() {
        let errs = errors(load_str(
            "[store]\ncheckpoint_interval = \"1 fortnight\"\n",
            &[],
        ));
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("checkpoint_interval"), "{errs:?}");
        assert!(errs[0].contains("examples: 250ms, 30s"), "{errs:?}");
        let errs = errors(load_str("[store]\nsegment_size = \"12 parsecs\"\n", &[]));
        assert!(errs[0].contains("not a size"), "{errs:?}");
        let errs = errors(load_str("[store]\nflush_interval = 500\n", &[]));
        assert!(errs[0].contains("duration"), "{errs:?}");
        let errs = errors(load_str("not toml = = 1", &[]));
        assert!(errs[0].contains("sluice.toml"), "{errs:?}");
    }

    #[test]
    fn env_overrides_file() {
        let c = load_str(
            "[server]\nlisten = \"127.0.0.1:9001\"\n[store]\nsegment_size = \"64MiB\"\n",
            &[
                ("SLUICE_LISTEN", "127.0.0.1:9002"),
                ("SLUICE_DATA_DIR", "/tmp/elsewhere"),
                ("SLUICE_STORE__SEGMENT_SIZE", "32MiB"),
                ("SLUICE_STORE__FLUSH", "async"),
                ("SLUICE_STORE__DISK_BUDGET", "off"),
                ("SLUICE_BROKER__MAX_PROPERTIES", "7"),
                ("SLUICE_ADMIN", "http://ignored:1"),
                ("HOME", "/root"),
            ],
        )
        .expect("loads");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:9002");
        assert_eq!(c.server.data_dir, PathBuf::from("/tmp/elsewhere"));
        assert_eq!(c.store.segment_size, ByteSize(32 << 20));
        assert_eq!(c.store.flush, FlushMode::Async);
        assert_eq!(c.broker.max_properties, 7);
    }

    #[test]
    fn flags_override_env() {
        let flags = Overrides {
            data_dir: Some("/flag".into()),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7001))),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7002))),
            flush: Some(FlushMode::Async),
        };
        let c = Config::load(
            None,
            env(&[
                ("SLUICE_DATA_DIR", "/env"),
                ("SLUICE_LISTEN", "127.0.0.1:9"),
                ("SLUICE_STORE__FLUSH", "sync"),
            ]),
            &flags,
        )
        .expect("loads");
        assert_eq!(c.server.data_dir, PathBuf::from("/flag"));
        assert_eq!(c.server.listen.port(), 7001);
        assert_eq!(c.server.admin_listen.port(), 7002);
        assert_eq!(c.store.flush, FlushMode::Async);
        assert_eq!(c.store_config().data_dir, PathBuf::from("/flag"));
        assert_eq!(c.broker_config().data_dir, PathBuf::from("/flag"));
    }

    #[test]
    fn cross_field_rules() {
        let errs = errors(load_str(
            "[server]\nadmin_listen = \"127.0.0.1:8081\"\nworker_threads = 5000\n[store]\nsegment_size = \"4MiB\"\n\
             max_message_size = \"8MiB\"\nretention = \"0s\"\ninline_sync_spin = \"5ms\"\n\
             checkpoint_interval = \"500us\"\nopen_queue_files = 8\nsyncer_nice = -21\n\
             [broker]\nmax_body_size = \"16MiB\"\n",
            &[],
        ));
        for needle in [
            "admin_listen",
            "more than 1024",
            "exceeds segment_size",
            "must exceed [broker] max_body_size",
            "[store] retention",
            "[store] inline_sync_spin",
            "[store] checkpoint_interval: must be at least 1ms",
            "[store] open_queue_files: must be at least 16",
            "[store] syncer_nice: must be between -20 and 19",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:#?}"
            );
        }
    }

    #[test]
    fn show_round_trips() {
        let mut c = Config::default();
        c.store.retention = None;
        c.store.disk_budget = Some(ByteSize(3_000_000_000));
        c.store.flush_interval = HumanDuration(Duration::from_millis(1500));
        c.broker.name = "b \"quoted\"".into();
        c.store.syncer_nice = -5;
        c.server.admin_token = Some("s3cret".into());
        let text = c.to_toml(true);
        assert!(text.contains("retention = \"off\""), "{text}");
        assert!(text.contains("disk_budget = \"3GB\""), "{text}");
        assert!(text.contains("segment_size = \"1GiB\""), "{text}");
        assert!(text.contains("flush_interval = \"1500ms\""), "{text}");
        let mut back = Config::default();
        let mut errs = Vec::new();
        back.apply_toml(&text, "shown", &mut errs);
        assert!(errs.is_empty(), "{errs:#?}");
        assert_eq!(back, c);
    }

    #[test]
    fn show_hides_secrets_unless_asked() {
        let mut c = Config::default();
        assert!(c.to_toml(false).contains("admin_token = \"off\""));
        c.server.admin_token = Some("s3cret".into());
        let text = c.to_toml(false);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("# admin_token = (set, hidden"), "{text}");
        assert!(c.to_toml(true).contains("admin_token = \"s3cret\""));
        // The hidden form still loads (the token falls back to its default).
        let mut back = Config::default();
        let mut errs = Vec::new();
        back.apply_toml(&text, "shown", &mut errs);
        assert!(errs.is_empty(), "{errs:#?}");
        assert_eq!(back.server.admin_token, None);
    }

    #[test]
    fn units_format_exactly() {
        assert_eq!(ByteSize(0).to_string(), "0");
        assert_eq!(ByteSize(4 << 20 | 64 << 10).to_string(), "4160KiB");
        assert_eq!(ByteSize(1234).to_string(), "1234");
        assert_eq!(
            HumanDuration(Duration::from_secs(72 * 3600)).to_string(),
            "72h"
        );
        assert_eq!(HumanDuration(Duration::from_secs(90)).to_string(), "90s");
        assert_eq!(
            HumanDuration(Duration::from_millis(500)).to_string(),
            "500ms"
        );
        assert_eq!(HumanDuration(Duration::from_micros(20)).to_string(), "20us");
        assert_eq!(
            HumanDuration(Duration::from_micros(1500)).to_string(),
            "1500us"
        );
    }

    /// Every key, with its environment variable, is documented in docs/configuration.md,
    /// and the reference documents no key that does not exist.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        let mut documented = Vec::new();
        let mut section = None;
        for line in doc.lines() {
            if let Some(rest) = line.strip_prefix("## `[") {
                section = rest.split(']').next().map(str::to_owned);
                continue;
            }
            if line.starts_with("## ") {
                section = None;
            }
            if let (Some(s), Some(rest)) = (&section, line.strip_prefix("| `")) {
                if let Some(key) = rest.split('`').next() {
                    documented.push((s.clone(), key.to_owned(), line.to_owned()));
                }
            }
        }
        for (section, keys) in Config::SCHEMA {
            for key in *keys {
                let row = documented
                    .iter()
                    .find(|(s, k, _)| s == section && k == key)
                    .map(|(_, _, row)| row);
                let Some(row) = row else {
                    panic!("docs/configuration.md has no row for [{section}] `{key}`");
                };
                let var = env_var(section, key);
                assert!(
                    row.contains(&format!("`{var}`")),
                    "the row of [{section}] {key} lacks `{var}`"
                );
            }
        }
        for (s, k, _) in &documented {
            assert!(
                Config::keys_of(s).is_some_and(|keys| keys.contains(&k.as_str())),
                "docs/configuration.md documents [{s}] `{k}`, which does not exist"
            );
        }
    }
}
