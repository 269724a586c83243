//! Reconcile cost at 100, 1,000 and 10,000 rooms (20 members each, 1 in 10 members a
//! linked person with a second account): a full `decide` next to what the worker does after
//! one new record (fold it, then decide for the rooms it touched), which must stay flat.
//!
//! The in-step pass (`core::step`) the same way: a full report next to the cached one.
//!
//! `cargo bench --bench reconcile`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use fedlink::core::{
    log_entry::{BotJoined, Entry, LinkSource, LogRecord, PduEntry, PduStatus, PersonSet, StateRef},
    reconcile::{decide, decide_touched, Routes},
    step,
    views::{Touched, Views},
};
use serde_json::json;

const BOT: &str = "@fedlink:fl";
const MEMBERS: usize = 20;

fn views_with(rooms: usize) -> (Views, u64) {
    let mut views = Views::new(BOT.try_into().unwrap());
    let mut seq = 0;
    let mut put = |views: &mut Views, entry: Entry| {
        seq += 1;
        views.apply(&LogRecord { v: 1, seq, at_ms: 0, entry });
    };
    for p in 0..(rooms * MEMBERS / 10).min(1000) {
        put(&mut views, Entry::PersonSet(PersonSet {
            person: format!("p{p}"),
            accounts: [format!("@u{p}:kiwi"), format!("@u{p}:litchi")].iter().map(|a| a.as_str().try_into().unwrap()).collect(),
            source: LinkSource::Admin,
        }));
    }
    for r in 0..rooms {
        let room_id: ruma::OwnedRoomId = format!("!r{r}:kiwi").try_into().unwrap();
        let mut state: Vec<StateRef> = (0..MEMBERS)
            .map(|m| StateRef {
                event_type: "m.room.member".into(),
                state_key: format!("@u{}:kiwi", (r * 7 + m) % 5000),
                event_id: format!("$m{r}_{m}").try_into().unwrap(),
                membership: Some("join".into()),
            })
            .collect();
        state.push(StateRef { event_type: "m.room.member".into(), state_key: BOT.into(), event_id: format!("$b{r}").try_into().unwrap(), membership: Some("join".into()) });
        put(&mut views, Entry::BotJoined(BotJoined {
            room_id,
            room_version: ruma::RoomVersionId::V11,
            join_event_id: format!("$b{r}").try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            state,
            power_levels: Some(json!({ "users": { BOT: 100 } })),
        }));
    }
    (views, seq)
}

fn message(room: usize, seq: u64) -> LogRecord {
    LogRecord {
        v: 1,
        seq,
        at_ms: 0,
        entry: Entry::Pdu(PduEntry {
            room_id: format!("!r{room}:kiwi").try_into().unwrap(),
            event_id: format!("$msg{seq}").try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: "m.room.message".into(),
            state_key: None,
            sender: "@u1:kiwi".try_into().unwrap(),
            membership: None,
            prev_events: vec![],
            depth: seq,
            origin_server_ts: 0,
            pdu: json!({ "content": { "body": "hi" } }),
            resolved_state: None,
            superseded: Vec::new(),
        }),
    }
}

fn bench_reconcile(c: &mut Criterion) {
    let routes = Routes::new();
    let mut g = c.benchmark_group("reconcile");
    g.sample_size(20);
    for rooms in [100usize, 1_000, 10_000] {
        let (mut views, mut seq) = views_with(rooms);
        views.touched = Touched::none();
        g.bench_with_input(BenchmarkId::new("full_decide", rooms), &rooms, |b, _| b.iter(|| black_box(decide(&views, &routes))));
        g.bench_with_input(BenchmarkId::new("after_one_record", rooms), &rooms, |b, _| {
            b.iter(|| {
                seq += 1;
                views.apply(&message(seq as usize % rooms, seq));
                let touched = std::mem::replace(&mut views.touched, Touched::none());
                black_box(decide_touched(&views, &routes, &touched))
            })
        });
    }
    g.finish();
}

/// The in-step pass (`fedlink_persons`, told notices): a full report next to the cached
/// one after one new record (classify the touched room again, swap its entries in the sums,
/// count persons by state).
fn bench_step(c: &mut Criterion) {
    let routes = Routes::new();
    let mut g = c.benchmark_group("step");
    g.sample_size(20);
    for rooms in [100usize, 1_000, 10_000] {
        let (mut views, mut seq) = views_with(rooms);
        g.bench_with_input(BenchmarkId::new("full_report", rooms), &rooms, |b, _| b.iter(|| black_box(step::report(&views, &routes))));
        let mut cache = step::StepCache::default();
        let all = std::mem::replace(&mut views.step_touched, Touched::none());
        cache.update(&views, &routes, &all);
        g.bench_with_input(BenchmarkId::new("after_one_record", rooms), &rooms, |b, _| {
            b.iter(|| {
                seq += 1;
                views.apply(&message(seq as usize % rooms, seq));
                let touched = std::mem::replace(&mut views.step_touched, Touched::none());
                cache.update(&views, &routes, &touched);
                // What the worker reads: the gauges' sums and the persons' states.
                black_box((cache.persons(&views), cache.account_rooms().len(), cache.out_of_step().len()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_reconcile, bench_step);
criterion_main!(benches);
