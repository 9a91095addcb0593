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

/// File descriptors kept for everything but client connections and consume-queue files:
/// commit-log segments, index files, the broker's own files, admin API connections, logs.
const FD_RESERVE: u64 = 1024;

/// Raises the soft limit on open files to the hard limit (the default soft limit is often
/// 1,024), and makes `[proxy] max_connections` and `[store] open_queue_files` fit in it
/// with [`FD_RESERVE`] to spare, lowering them (with a warning) if they do not. Out of
/// descriptors, the store's next segment roll would fail, and a failed write fences it.
pub fn fit_file_limit(cfg: &mut Config) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-files limit");
        }
    }
    let limit = if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_cur
    };
    let (conns, files) = fit_descriptors(
        limit,
        u64::from(cfg.proxy.max_connections),
        u64::from(cfg.store.open_queue_files),
    );
    tracing::info!(
        limit,
        soft_limit_before = before,
        max_connections = conns,
        open_queue_files = files,
        "open-files limit"
    );
    if conns < u64::from(cfg.proxy.max_connections) || files < u64::from(cfg.store.open_queue_files)
    {
        tracing::warn!(
            limit,
            "the open-files limit is too low for [proxy] max_connections ({}) plus [store] \
             open_queue_files ({}) plus {FD_RESERVE} for other files: using {conns} and \
             {files}; raise the limit (ulimit -n, systemd LimitNOFILE=)",
            cfg.proxy.max_connections,
            cfg.store.open_queue_files,
        );
        cfg.proxy.max_connections = u32::try_from(conns).unwrap_or(u32::MAX);
        cfg.store.open_queue_files = u32::try_from(files).unwrap_or(u32::MAX);
    }
}

/// (connections, queue files) that fit in `limit` descriptors with [`FD_RESERVE`] to
/// spare: as asked if they fit; otherwise the queue files get at most a quarter of what is
/// left (at least 16) and connections the rest (at least 16; below that nothing fits, and
/// the reserve shrinks).
fn fit_descriptors(limit: u64, conns: u64, files: u64) -> (u64, u64) {
    let budget = limit.saturating_sub(FD_RESERVE);
    if conns.saturating_add(files) <= budget {
        return (conns, files);
    }
    let files = files.min((budget / 4).max(16));
    let conns = conns.min(budget.saturating_sub(files).max(16));
    (conns, files)
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
        clean_shutdown = r.clean_shutdown,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_shared_out_within_the_limit() {
        // Enough: as configured.
        assert_eq!(fit_descriptors(1 << 20, 16_384, 4096), (16_384, 4096));
        assert_eq!(fit_descriptors(u64::MAX, 16_384, 4096), (16_384, 4096));
        // 20,000: 18,976 after the reserve; queue files keep 4096, connections get the rest.
        assert_eq!(fit_descriptors(20_000, 16_384, 4096), (14_880, 4096));
        // The common soft limit of 1,024 after a failed raise: nothing left but the floors.
        assert_eq!(fit_descriptors(1024, 16_384, 4096), (16, 16));
        // 4,096: 3,072 to share, a quarter (768) for queue files.
        assert_eq!(fit_descriptors(4096, 16_384, 4096), (2304, 768));
        for limit in [1025, 2048, 5000, 65_536] {
            let (c, f) = fit_descriptors(limit, 16_384, 4096);
            assert!(
                c + f + FD_RESERVE <= limit.max(32 + FD_RESERVE),
                "{limit}: {c} + {f}"
            );
            assert!(c >= 16 && f >= 16);
        }
    }
}
