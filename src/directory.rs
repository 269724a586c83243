//! Changes to the directory of linked accounts, from the config, the admin API and the
//! HTTP directory. Every change is checked against the directory view (an account belongs
//! to at most one person) and logged; the views and the reconciler do the rest.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use ruma::{OwnedRoomId, OwnedUserId, UserId};

use crate::{
    node::Fedlink,
    core::{
        log_entry::{Entry, LinkSource, OptOut, PersonRemoved, PersonSet},
        views::directory::DirectoryError,
    },
    store::StoreError,
};

/// A refused directory change.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Conflict or invalid input.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// An account id is not a user id.
    #[error("`{0}` is not a Matrix user id")]
    BadAccount(String),
    /// The person does not exist.
    #[error("no person `{0}`")]
    NoSuchPerson(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parse account strings.
pub fn parse_accounts(raw: &[String]) -> Result<Vec<OwnedUserId>, ChangeError> {
    let mut out: Vec<OwnedUserId> = Vec::new();
    for a in raw {
        let u = UserId::parse(a).map_err(|_| ChangeError::BadAccount(a.clone()))?;
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}

/// Create or replace a person. Returns whether anything changed.
pub async fn set_person(app: &Fedlink, person: &str, accounts: Vec<OwnedUserId>, source: LinkSource) -> Result<bool, ChangeError> {
    let _lock = app.lock_ingest().await;
    let mut entries = Vec::new();
    {
        let views = app.views.read().await;
        views.directory.check_set(person, &accounts, source)?;
        let wanted: BTreeSet<&OwnedUserId> = accounts.iter().collect();
        if let Some(p) = views.directory.persons.get(person) {
            if p.accounts.iter().collect::<BTreeSet<_>>() == wanted && p.source == source {
                return Ok(false);
            }
        }
        // Self-made links yield to this one: their persons keep their other accounts.
        for (other, rest) in views.directory.taken_over(person, &accounts) {
            tracing::info!(person = %other, by = %person, source = source.label(), "a self-made link yields to a managed one");
            entries.push(match rest {
                Some(rest) => Entry::PersonSet(PersonSet { person: other, accounts: rest, source: LinkSource::SelfService }),
                None => Entry::PersonRemoved(PersonRemoved { person: other, source }),
            });
        }
    }
    entries.push(Entry::PersonSet(PersonSet { person: person.to_owned(), accounts, source }));
    app.append(entries, None).await?;
    app.store.flush().await?;
    tracing::info!(%person, source = source.label(), "person linked");
    Ok(true)
}

/// Remove a person.
pub async fn remove_person(app: &Fedlink, person: &str, source: LinkSource) -> Result<(), ChangeError> {
    let _lock = app.lock_ingest().await;
    if !app.views.read().await.directory.persons.contains_key(person) {
        return Err(ChangeError::NoSuchPerson(person.to_owned()));
    }
    app.append(vec![Entry::PersonRemoved(PersonRemoved { person: person.to_owned(), source })], None).await?;
    app.store.flush().await?;
    tracing::info!(%person, ?source, "person unlinked");
    Ok(())
}

/// Change a person's settings.
pub async fn set_settings(app: &Fedlink, person: &str, auto_join: bool) -> Result<(), ChangeError> {
    let _lock = app.lock_ingest().await;
    if !app.views.read().await.directory.persons.contains_key(person) {
        return Err(ChangeError::NoSuchPerson(person.to_owned()));
    }
    app.append(vec![Entry::PersonSettings(crate::core::log_entry::PersonSettings { person: person.to_owned(), auto_join })], None).await?;
    app.store.flush().await?;
    Ok(())
}

/// Opt a person out of (or back into) syncing.
pub async fn opt_out(app: &Fedlink, person: &str, room_id: Option<OwnedRoomId>, opted_out: bool) -> Result<(), ChangeError> {
    let _lock = app.lock_ingest().await;
    if !app.views.read().await.directory.persons.contains_key(person) {
        return Err(ChangeError::NoSuchPerson(person.to_owned()));
    }
    app.append(vec![Entry::OptOut(OptOut { person: person.to_owned(), room_id, opted_out })], None).await?;
    app.store.flush().await?;
    Ok(())
}

/// Bring the directory in line with `[[directory.person]]`: add or update configured
/// persons, remove config-sourced persons no longer configured. A configured account that
/// belongs to a person set through the admin API or the HTTP directory is an error.
pub async fn sync_config(app: &Fedlink) -> anyhow::Result<()> {
    let configured: Vec<(String, Vec<OwnedUserId>)> = app
        .cfg
        .directory
        .person
        .iter()
        .map(|p| Ok((p.id.clone(), parse_accounts(&p.accounts)?)))
        .collect::<Result<_, ChangeError>>()?;
    let stale: Vec<String> = app
        .views
        .read()
        .await
        .directory
        .persons
        .iter()
        .filter(|(id, p)| p.source == LinkSource::Config && !configured.iter().any(|(c, _)| c == *id))
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        remove_person(app, &id, LinkSource::Config).await?;
    }
    for (i, (id, accounts)) in configured.into_iter().enumerate() {
        set_person(app, &id, accounts, LinkSource::Config)
            .await
            .map_err(|e| anyhow::anyhow!("directory.person[{i}] (`{id}`): {e}"))?;
    }
    Ok(())
}

/// Person id for a set found through the HTTP directory: derived from its smallest account.
pub fn http_person_id(accounts: &[OwnedUserId]) -> String {
    let first = accounts.iter().min().map(|u| u.as_str()).unwrap_or("");
    let cleaned: String = first.chars().map(|c| if c.is_ascii_alphanumeric() || "._=-".contains(c) { c } else { '_' }).collect();
    let mut id = format!("dir.{cleaned}");
    id.truncate(64);
    id
}

/// Asks the HTTP directory about every account seen in the bot's rooms, caching answers
/// for `directory.ttl_secs`. Failures are logged and counted; they never unlink anyone.
/// An answer links; only the admin API or the config unlink.
pub async fn http_worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(base) = app.cfg.directory.url.clone() else { return };
    let ttl = Duration::from_secs(app.cfg.directory.ttl_secs);
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the directory client");
            return;
        }
    };
    let mut fresh: std::collections::HashMap<OwnedUserId, std::time::Instant> = std::collections::HashMap::new();
    loop {
        let accounts: BTreeSet<OwnedUserId> = {
            let views = app.views.read().await;
            views
                .rooms
                .values()
                .filter(|r| r.bot_joined())
                .flat_map(|r| r.members.iter().filter(|(_, m)| *m == "join" || *m == "invite").map(|(u, _)| u.clone()))
                .filter(|u| u.server_name() != app.server_name)
                .collect()
        };
        for account in accounts {
            if fresh.get(&account).is_some_and(|t| t.elapsed() < ttl) {
                continue;
            }
            let url = format!("{base}{}", crate::federation::client::enc(account.as_str()));
            let answer = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => r.json::<Vec<String>>().await.map_err(|e| e.to_string()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(others) => {
                    app.metrics.directory_lookups.with_label_values(&["ok"]).inc();
                    fresh.insert(account.clone(), std::time::Instant::now());
                    let mut all = match parse_accounts(&others) {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(%account, error = %e, "directory answered an invalid account");
                            continue;
                        }
                    };
                    if all.is_empty() {
                        continue;
                    }
                    all.push(account.clone());
                    all.sort();
                    all.dedup();
                    let existing = app.views.read().await.directory.by_account.get(&account).cloned();
                    let id = existing.unwrap_or_else(|| http_person_id(&all));
                    match set_person(&app, &id, all, LinkSource::Http).await {
                        Ok(_) => {}
                        Err(e) => tracing::warn!(%account, error = %e, "directory link refused"),
                    }
                }
                Err(reason) => {
                    app.metrics.directory_lookups.with_label_values(&["error"]).inc();
                    tracing::warn!(%account, %reason, "directory lookup failed; links unchanged");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
