//! The `fedlink` command: parses the CLI, sets up logging, and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedlink::{app, config::Config, keys::SigningKey};

#[derive(Parser)]
#[command(name = "fedlink", version, about = "Federation-level linked-identity sync for Matrix")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the federation peer.
    Run {
        /// Config file.
        #[arg(short, long, env = "FEDLINK_CONFIG")]
        config: PathBuf,
    },
    /// Write a new signing key in Synapse's format (refuses to overwrite).
    GenerateKey {
        /// Output path.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Validate the config and print it with secrets redacted.
    CheckConfig {
        /// Config file.
        #[arg(short, long, env = "FEDLINK_CONFIG")]
        config: PathBuf,
    },
    /// Print the application-service registration YAML for one homeserver.
    AppserviceRegistration {
        /// Config file.
        #[arg(short, long, env = "FEDLINK_CONFIG")]
        config: PathBuf,
        /// The homeserver's server name (an `[[appservice]]` entry).
        #[arg(long)]
        server: String,
    },
    /// Rebuild every view from the event log.
    Replay {
        /// Config file.
        #[arg(short, long, env = "FEDLINK_CONFIG")]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

/// The log filter unless `FEDLINK_LOG` sets one.
const DEFAULT_LOG: &str = "warn,fedlink=info";

fn main() -> anyhow::Result<()> {
    // Third-party crates at `warn` by default: fedlink's own lines are the decisions.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEDLINK_LOG").unwrap_or_else(|_| DEFAULT_LOG.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match std::env::var("FEDLINK_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().flatten_event(true).with_current_span(false).init(),
        Ok("text") | Err(_) => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        Ok(other) => {
            builder.with_ansi(false).init();
            tracing::warn!(value = other, "FEDLINK_LOG_FORMAT must be `text` or `json`; logging as text");
        }
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::GenerateKey { output } => {
            let key = SigningKey::generate();
            key.write_new(&output)?;
            println!("wrote {} ({})", output.display(), key.key_id());
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let cfg = load(&config)?;
            cfg.admin_token()?;
            print!("{}", toml::to_string_pretty(&cfg.redacted())?);
            eprintln!("config OK");
            Ok(())
        }
        Cmd::AppserviceRegistration { config, server } => {
            let cfg = load(&config)?;
            print!("{}", fedlink::appservice::registration_yaml(&cfg, &server).map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Cmd::Replay { config } => {
            let cfg = load(&config)?;
            let (store, _) = fedlink::store::Store::open_configured(&cfg.storage.path, cfg.storage.cache_mb * 1024 * 1024, cfg.storage.compression).context("storage.path")?;
            let bot = cfg.bot_user_id().try_into().context("bot.localpart")?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                store.clear_views()?;
                let started = std::time::Instant::now();
                let views = app::fold_views(&store, bot, true)?;
                let fold_s = started.elapsed().as_secs_f64();
                store.save_views(&views, None).await?;
                println!(
                    "replayed {} log entries into {} rooms: folded in {fold_s:.2} s ({:.0} records/s), views written in {:.2} s",
                    views.folded_seq,
                    views.rooms.len(),
                    views.folded_seq as f64 / fold_s.max(1e-9),
                    started.elapsed().as_secs_f64() - fold_s
                );
                anyhow::Ok(())
            })
        }
        Cmd::Run { config } => {
            let cfg = load(&config)?;
            let listeners = app::Listeners::bind(&cfg)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(app::run(cfg, listeners, shutdown_signal()))
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
