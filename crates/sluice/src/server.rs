//! `sluice server`: opens the store and the broker, serves the gRPC and admin endpoints,
//! and shuts down cleanly on SIGTERM or SIGINT. SIGHUP rereads the ACL file.
//!
//! Shutdown order matters: first both servers stop accepting and finish the requests in
//! flight (so no request changes state after the snapshot), then the maintenance task takes
//! its final POP snapshot, then the store flushes and writes its last checkpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use sluice_broker::Broker;
use sluice_common::SystemClock;
use sluice_proxy::auth::SharedAcl;
use sluice_store::{RecoveryReport, Store};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the ACL file is looked at for a change (SIGHUP rereads it at once).
const ACL_POLL: Duration = Duration::from_secs(2);

/// Switches transparent huge pages off for this process unless `enabled`
/// (`[server] transparent_huge_pages`).
///
/// With huge pages, a first touch of a 2 MiB-aligned region the allocator has mapped is a
/// fault that clears 2 MiB, and, when free memory is fragmented (the page cache of the
/// commit log fragments it), compacts memory first. In the paced gRPC benchmark such faults
/// on a runtime thread were 10–30 ms pauses with no request answered, and they set the
/// p99 (docs/benchmarks.md). Applies to every mapping of the process, present and future;
/// the page cache of the data files does not use them either way.
pub fn set_transparent_huge_pages(enabled: bool) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes one integer flag and no pointers.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_THP_DISABLE,
                libc::c_ulong::from(!enabled),
                0,
                0,
                0,
            )
        };
        if r != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set transparent huge pages");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = enabled;
}

/// Rereads the ACL file on SIGHUP and whenever its modification time or size changes, and
/// puts it in force for the requests that follow. A file that cannot be read or parsed
/// leaves the ACL in force as it was, and says so in the log; it is read again once it
/// changes (or on the next SIGHUP).
async fn watch_acl(
    path: PathBuf,
    acl: Arc<SharedAcl>,
    mut hup: Signal,
    stop: watch::Receiver<bool>,
) {
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(ACL_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        let signalled = tokio::select! {
            _ = &mut stop => return,
            // `None`: the signal driver is gone (the runtime is shutting down).
            r = hup.recv() => match r {
                Some(()) => true,
                None => return,
            },
            _ = tick.tick() => false,
        };
        let now = stamp(&path);
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        let p = path.clone();
        match tokio::task::spawn_blocking(move || crate::config::load_acl(&p)).await {
            Ok(Ok(new)) => {
                let users = new.len();
                acl.replace(new);
                tracing::info!(users, file = %path.display(), "ACL reloaded");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "ACL not reloaded; the previous one stays in force")
            }
            Err(e) => tracing::error!(error = %e, "ACL reload task failed"),
        }
    }
}

/// Logs SIGHUPs when there is nothing to reload (so they do not end the server).
async fn ignore_hup(mut hup: Signal, stop: watch::Receiver<bool>) {
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = hup.recv() => match r {
                Some(()) => tracing::info!("SIGHUP: no ACL file to reload ([proxy] acl_file)"),
                None => return,
            },
        }
    }
}

/// Resolves once `rx` turns true (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn log_recovery(r: &RecoveryReport) {
    tracing::info!(
        replayed_from = r.replayed_from,
        records_replayed = r.records_replayed,
        valid_end = r.valid_end,
        dropped_bytes = r.dropped_bytes,
        full_rebuild = r.full_rebuild,
        took_ms = r.duration.as_millis() as u64,
        "store recovery report"
    );
    if let Some((file, offset, reason)) = &r.truncated_at {
        tracing::warn!(%file, offset, %reason, "recovery cut off a torn or invalid tail");
    }
}

/// Runs the server until a signal arrives. Errors if start-up fails or a server stops on
/// its own.
pub async fn serve(mut cfg: Config) -> Result<()> {
    let started_at = SystemTime::now();
    // Installed first, so a signal during start-up is not fatal but stops us once started.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    // Absolute, so logs and the status endpoint say where the data really is.
    if let Ok(abs) = std::path::absolute(&cfg.server.data_dir) {
        cfg.server.data_dir = abs;
    }
    let data_dir = cfg.server.data_dir.clone();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %data_dir.display(),
        flush = cfg.store.flush.as_str(),
        "starting sluice"
    );

    let store_cfg = cfg.store_config();
    let store = tokio::task::spawn_blocking(move || Store::open(store_cfg))
        .await
        .context("store start-up task failed")?
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    log_recovery(store.recovery_report());
    let store = Arc::new(store);

    let broker_cfg = cfg.broker_config();
    let s = store.clone();
    let broker =
        tokio::task::spawn_blocking(move || Broker::open(broker_cfg, s, Arc::new(SystemClock)))
            .await
            .context("broker start-up task failed")?
            .context("opening the broker")?;

    let grpc = TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding the gRPC endpoint to {}", cfg.server.listen))?;
    let admin = TcpListener::bind(cfg.server.admin_listen)
        .await
        .with_context(|| format!("binding the admin API to {}", cfg.server.admin_listen))?;
    let grpc_addr = grpc.local_addr().context("gRPC listener address")?;
    let admin_addr = admin.local_addr().context("admin listener address")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (maint_tx, maint_rx) = watch::channel(false);
    let mut servers: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    let proxy_cfg = cfg.proxy_config().map_err(anyhow::Error::msg)?;
    match (&proxy_cfg.acl, &cfg.proxy.acl_file) {
        (Some(acl), Some(path)) => {
            tracing::info!(
                users = acl.current().len(),
                "authentication on: requests must be signed"
            );
            tokio::spawn(watch_acl(
                path.clone(),
                acl.clone(),
                sighup,
                stop_rx.clone(),
            ));
        }
        _ => {
            tracing::info!("authentication off ([proxy] acl_file)");
            tokio::spawn(ignore_hup(sighup, stop_rx.clone()));
        }
    }
    let proxy = sluice_proxy::run(grpc, broker.clone(), proxy_cfg, stopped(stop_rx.clone()));
    servers.spawn(async move { ("gRPC endpoint", proxy.await.map_err(anyhow::Error::from)) });
    let info = sluice_admin::BrokerInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        flush_policy: cfg.store.flush.as_str().to_owned(),
        data_dir: cfg.server.data_dir.clone(),
    };
    let admin_options = sluice_admin::AdminOptions {
        token: cfg.server.admin_token.clone(),
    };
    if admin_options.token.is_none() && !cfg.server.admin_listen.ip().is_loopback() {
        tracing::warn!(admin = %cfg.server.admin_listen, "the admin API listens beyond this host without a token ([server] admin_token)");
    }
    let admin_srv = sluice_admin::run(admin, broker.clone(), info, admin_options, stopped(stop_rx));
    servers.spawn(async move { ("admin API", admin_srv.await.map_err(anyhow::Error::from)) });
    let maintenance = tokio::spawn(broker.clone().run_maintenance(maint_rx));

    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "ready");

    let mut failure = None;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT received; shutting down"),
        Some(done) = servers.join_next() => {
            let what = match done {
                Ok((name, Ok(()))) => anyhow!("the {name} stopped unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("the {name} failed")),
                Err(e) => anyhow!("a server task failed: {e}"),
            };
            tracing::error!(error = format!("{what:#}"), "shutting down");
            failure = Some(what);
        }
    }

    // Stop accepting; let in-flight requests finish, within bounds.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = servers.join_next().await {
            match done {
                Ok((name, Ok(()))) => tracing::info!("{name} stopped"),
                Ok((name, Err(e))) => {
                    tracing::warn!(error = format!("{e:#}"), "{name} failed while stopping")
                }
                Err(e) => tracing::warn!(error = %e, "server task failed while stopping"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_s = DRAIN_TIMEOUT.as_secs(),
            "requests still in flight after the drain timeout; cancelling them"
        );
        servers.abort_all();
    }

    // The maintenance task takes the final POP snapshot when it stops.
    let _ = maint_tx.send(true);
    let snapshotted = matches!(
        tokio::time::timeout(DRAIN_TIMEOUT, maintenance).await,
        Ok(Ok(()))
    );
    if !snapshotted {
        tracing::warn!("maintenance did not stop cleanly; taking the POP snapshot directly");
        let b = broker.clone();
        match tokio::task::spawn_blocking(move || b.snapshot_pop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "POP snapshot failed"),
            Err(e) => tracing::error!(error = %e, "POP snapshot task failed"),
        }
    }
    drop(broker);

    // Flush everything and write the final checkpoint.
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.close())
        .await
        .context("closing the store")?;
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
