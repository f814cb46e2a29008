//! Planning an evacuation: where each guest of a host goes. Greedy, largest guests first, each
//! to the host it fits that keeps the most memory free (so the load spreads). A guest fits a
//! host that is up and not in maintenance, has the memory free, offers every CPU feature the
//! guest was given, and lets in what it uses.

use serde::{Deserialize, Serialize};

use crate::records::{GuestRecord, HostRecord, HostState};

/// A host and its state, as listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    #[serde(flatten)]
    pub record: HostRecord,
    pub state: HostState,
}

/// One guest's move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub uuid: String,
    pub name: String,
    pub memory_mib: u64,
    pub to: String,
    /// The destination's relocation address.
    pub address: String,
}

/// Where every guest of `from` goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvacuationPlan {
    pub from: String,
    pub moves: Vec<Move>,
}

/// A guest no host can take, and why not, host by host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("no host can take guest '{name}' ({memory_mib} MiB): {}", why_not.iter().map(|(h, w)| format!("{h}: {w}")).collect::<Vec<_>>().join("; "))]
pub struct NoRoom {
    pub name: String,
    pub memory_mib: u64,
    pub why_not: Vec<(String, String)>,
}

/// Plans moving `guests` (those of `from`) to the other hosts.
pub fn plan_evacuation(
    from: &str,
    hosts: &[HostView],
    guests: &[GuestRecord],
) -> Result<EvacuationPlan, NoRoom> {
    let mut free: Vec<(&HostView, u64)> = hosts
        .iter()
        .filter(|h| h.record.name != from)
        .map(|h| (h, h.record.memory_free_mib))
        .collect();
    let mut order: Vec<&GuestRecord> = guests.iter().collect();
    order.sort_by(|a, b| b.memory_mib.cmp(&a.memory_mib).then(a.name.cmp(&b.name)));
    let mut moves = Vec::with_capacity(order.len());
    for guest in order {
        let mut why_not = Vec::new();
        let mut best: Option<usize> = None;
        for (i, (host, left)) in free.iter().enumerate() {
            match unfit(host, *left, guest) {
                Some(why) => why_not.push((host.record.name.clone(), why)),
                None => {
                    let better = best.is_none_or(|b| {
                        let (bh, bl) = &free[b];
                        *left > *bl || (*left == *bl && host.record.name < bh.record.name)
                    });
                    if better {
                        best = Some(i);
                    }
                }
            }
        }
        let Some(chosen) = best else {
            if free.is_empty() {
                why_not.push(("pool".into(), "there is no other host".into()));
            }
            return Err(NoRoom {
                name: guest.name.clone(),
                memory_mib: guest.memory_mib,
                why_not,
            });
        };
        let (host, left) = &mut free[chosen];
        *left -= guest.memory_mib;
        moves.push(Move {
            uuid: guest.uuid.clone(),
            name: guest.name.clone(),
            memory_mib: guest.memory_mib,
            to: host.record.name.clone(),
            address: host.record.address.clone(),
        });
    }
    Ok(EvacuationPlan {
        from: from.to_string(),
        moves,
    })
}

/// Why `guest` cannot go to `host` with `free` MiB left there.
fn unfit(host: &HostView, free: u64, guest: &GuestRecord) -> Option<String> {
    match host.state {
        HostState::Up => {}
        HostState::Maintenance => return Some("in maintenance".into()),
        HostState::Down => return Some("down".into()),
    }
    if free < guest.memory_mib {
        return Some(format!("{free} MiB free"));
    }
    let missing: Vec<&str> = guest
        .cpu_features
        .iter()
        .filter(|f| !host.record.cpu_features.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!("lacks CPU features {}", missing.join(", ")));
    }
    host.record.admits.refuses(&guest.needs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Admits;

    fn host(name: &str, free: u64, state: HostState) -> HostView {
        HostView {
            record: HostRecord {
                name: name.into(),
                address: format!("{name}:8002"),
                memory_free_mib: free,
                cpu_features: vec!["avx2".into()],
                admits: Admits {
                    incoming: true,
                    ..Admits::default()
                },
                ..HostRecord::default()
            },
            state,
        }
    }

    fn guest(name: &str, mib: u64) -> GuestRecord {
        GuestRecord {
            uuid: format!("uuid-{name}"),
            name: name.into(),
            host: "h1".into(),
            memory_mib: mib,
            cpu_features: vec!["avx2".into()],
            ..GuestRecord::default()
        }
    }

    #[test]
    fn guests_spread_over_the_hosts_with_room() {
        let hosts = [
            host("h1", 0, HostState::Maintenance),
            host("h2", 1000, HostState::Up),
            host("h3", 1000, HostState::Up),
            host("h4", 5000, HostState::Down),
        ];
        let guests: Vec<_> = (0..6).map(|i| guest(&format!("g{i}"), 256)).collect();
        let plan = plan_evacuation("h1", &hosts, &guests).unwrap();
        assert_eq!(plan.moves.len(), 6);
        let to_h2 = plan.moves.iter().filter(|m| m.to == "h2").count();
        assert_eq!(to_h2, 3, "{plan:?}");
        assert!(plan.moves.iter().all(|m| m.to != "h4"));
    }

    #[test]
    fn a_guest_that_fits_nowhere_refuses_the_plan() {
        let hosts = [
            host("h2", 600, HostState::Up),
            host("h3", 300, HostState::Up),
        ];
        let guests = [guest("a", 512), guest("b", 512)];
        let err = plan_evacuation("h1", &hosts, &guests).unwrap_err();
        assert_eq!(err.name, "b");
        assert!(err.to_string().contains("h2: 88 MiB free"), "{err}");
    }

    #[test]
    fn cpu_features_and_policy_rule_hosts_out() {
        let mut h2 = host("h2", 4000, HostState::Up);
        h2.record.cpu_features.clear();
        let mut h3 = host("h3", 4000, HostState::Up);
        h3.record.admits.incoming = false;
        let h4 = host("h4", 1000, HostState::Up);
        let plan =
            plan_evacuation("h1", &[h2.clone(), h3.clone(), h4], &[guest("a", 512)]).unwrap();
        assert_eq!(plan.moves[0].to, "h4");
        let err = plan_evacuation("h1", &[h2, h3], &[guest("a", 512)]).unwrap_err();
        assert!(err.to_string().contains("lacks CPU features avx2"), "{err}");
        assert!(err.to_string().contains("no incoming"), "{err}");
    }
}
