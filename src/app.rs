//! Wiring: open storage, load keys, fold views, build the HTTP servers, spawn the services
//! (joins, snapshots, outbox, sync, directory) and shut down cleanly when the shutdown
//! future resolves. Nothing imports this module.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;

use crate::{config::Config, node::Fedlink};

pub use crate::node::fold_views;

/// Bound listeners, so tests can use port 0 and learn the real ports.
pub struct Listeners {
    /// The federation (TLS) listener.
    pub federation: std::net::TcpListener,
    /// The metrics/admin listener.
    pub metrics: std::net::TcpListener,
}

impl Listeners {
    /// Bind the configured addresses.
    pub fn bind(cfg: &Config) -> anyhow::Result<Self> {
        let f = std::net::TcpListener::bind(cfg.federation_addr()?).with_context(|| format!("listen.federation {}", cfg.listen.federation))?;
        let m = std::net::TcpListener::bind(cfg.metrics_addr()?).with_context(|| format!("listen.metrics {}", cfg.listen.metrics))?;
        f.set_nonblocking(true)?;
        m.set_nonblocking(true)?;
        Ok(Self { federation: f, metrics: m })
    }

    /// The bound addresses (federation, metrics).
    pub fn addrs(&self) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        Ok((self.federation.local_addr()?, self.metrics.local_addr()?))
    }
}

/// Run fedlink until `shutdown` resolves.
pub async fn run(cfg: Config, listeners: Listeners, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    ensure_tls_files(&cfg)?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cfg.tls.cert, &cfg.tls.key)
        .await
        .with_context(|| format!("tls.cert {} / tls.key {}", cfg.tls.cert.display(), cfg.tls.key.display()))?;
    let app = Fedlink::open(cfg)?;
    crate::directory::sync_config(&app).await?;
    app.metrics.log_entries.set(app.store.last_seq() as i64);
    {
        let views = app.views.read().await;
        app.update_view_gauges(&views);
    }
    let (fed_addr, metrics_addr) = listeners.addrs()?;
    tracing::info!(server_name = %app.server_name, key_id = %app.key.key_id(), %fed_addr, %metrics_addr, "fedlink starting");

    let handle = axum_server::Handle::new();
    let fed_router = crate::federation::server::router(app.clone());
    let fed = axum_server::from_tcp_rustls(listeners.federation, tls)
        .handle(handle.clone())
        .serve(fed_router.into_make_service());
    let admin_router = crate::admin::router(app.clone());
    let admin_listener = tokio::net::TcpListener::from_std(listeners.metrics)?;
    let stop_tx = app.stop.clone();
    let stop_rx = stop_tx.subscribe();
    let mut admin_stop = stop_rx.clone();
    let admin = axum::serve(admin_listener, admin_router).with_graceful_shutdown(async move {
        let _ = admin_stop.wait_for(|s| *s).await;
    });

    let joins = tokio::spawn(crate::federation::membership::join_worker(app.clone(), stop_rx.clone()));
    let snapshots = tokio::spawn(crate::snapshot::worker(app.clone(), stop_rx.clone()));
    let outbox = tokio::spawn(crate::outbox::worker(app.clone(), stop_rx.clone()));
    let sync = tokio::spawn(crate::sync::worker(app.clone(), stop_rx.clone()));
    let directory = tokio::spawn(crate::directory::http_worker(app.clone(), stop_rx.clone()));
    let catch_up = tokio::spawn(crate::appservice::catch_up_worker(app.clone(), stop_rx.clone()));
    let step = tokio::spawn(crate::sync::step_worker(app.clone(), stop_rx.clone()));
    let bot = tokio::spawn(crate::bot::worker(app.clone(), stop_rx.clone()));
    let memory = tokio::spawn(crate::memory::worker(app.clone(), stop_rx.clone()));

    let fed_task = {
        // Not ready once the federation listener stops serving, whatever the cause.
        let app = app.clone();
        tokio::spawn(async move {
            let r = fed.await;
            app.federation_listening.store(false, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = &r {
                tracing::error!(error = %e, "the federation listener stopped");
            }
            r
        })
    };
    {
        // Ready once the federation listener serves (storage, views and keys are loaded by
        // `Fedlink::open` already).
        let (app, handle) = (app.clone(), handle.clone());
        tokio::spawn(async move {
            if handle.listening().await.is_some() {
                app.federation_listening.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("ready");
            }
        });
    }
    let admin_task = tokio::spawn(async move { admin.await });
    shutdown.await;
    tracing::info!("shutting down");
    app.federation_listening.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = stop_tx.send(true);
    handle.graceful_shutdown(Some(Duration::from_secs(10)));
    let _ = fed_task.await;
    let _ = admin_task.await;
    let _ = joins.await;
    let _ = snapshots.await;
    let _ = outbox.await;
    let _ = sync.await;
    let _ = directory.await;
    let _ = catch_up.await;
    let _ = step.await;
    let _ = bot.await;
    let _ = memory.await;
    app.snapshot().await?;
    app.store.flush().await?;
    tracing::info!("stopped");
    Ok(())
}

/// With `tls.self_signed`, create a certificate for the server name's host when the files
/// are missing.
fn ensure_tls_files(cfg: &Config) -> anyhow::Result<()> {
    if !cfg.tls.self_signed || (cfg.tls.cert.exists() && cfg.tls.key.exists()) {
        return Ok(());
    }
    let (host, _) = crate::federation::discovery::split_host_port(&cfg.server_name);
    let mut names = vec![host.trim_start_matches('[').trim_end_matches(']').to_owned()];
    for n in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_owned());
        }
    }
    let ck = rcgen::generate_simple_self_signed(names).context("tls.self_signed: generating a certificate")?;
    for (path, pem) in [(&cfg.tls.cert, ck.cert.pem()), (&cfg.tls.key, ck.key_pair.serialize_pem())] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("tls: creating {}", dir.display()))?;
        }
        std::fs::write(path, pem).with_context(|| format!("tls: writing {}", path.display()))?;
    }
    tracing::warn!(cert = %cfg.tls.cert.display(), "generated a self-signed TLS certificate (tls.self_signed); use a real one in production");
    Ok(())
}

