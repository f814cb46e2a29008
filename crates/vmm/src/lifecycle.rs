//! The guest process's life cycle as one state machine.
//!
//! What the process is doing with its guest is one [`State`], held by the [`Lifecycle`]
//! controller (its own small lock, never the machine's: a save that holds the machine for
//! minutes does not stop `status` from answering). Every request that changes it — pause,
//! unpause, the power button, save, migrate, destroy — and every outcome of a long operation
//! — a save or a migration ending, the answer about an unresolved migration, an incoming
//! migration committing or giving up — is an [`Event`]. [`Lifecycle::apply`] checks the event
//! against the current state and moves to the next state in one step under its lock, or
//! refuses it with a message for the user and changes nothing. [`next`] is the whole table;
//! ARCHITECTURE.md has it as a table too.
//!
//! An outgoing migration has stages of its own ([`OutStage`]): a cancel is accepted while the
//! guest is still this host's and refused once the engine passed the commit point; the engine
//! asks to pass it ([`Event::CommitPoint`]) in the same check-and-set, so a cancel and the
//! handover never both succeed.
//!
//! The state says what the machine should be doing; the thread that made the transition then
//! does it (pauses, resumes, writes, sends). A long operation owns the machine while its state
//! lasts (`Saving`, `MigratingOut`, `Incoming`), so requests that would touch the machine are
//! refused then rather than queued behind it.

use std::sync::{Mutex, MutexGuard};

use tern_api::vmm::VmmRunState;

/// What the guest process is doing with its guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// The vCPUs may run.
    Running,
    /// Paused on request (or created or restored paused); nothing else is going on.
    Paused,
    /// A checkpoint is being written to `path`. `resume`: the guest ran before the save and
    /// runs on afterwards if it is kept running (or if the save fails).
    Saving { path: String, resume: bool },
    /// The guest is being sent to `destination`. `back` is the state a failed migration
    /// returns to (`Running`, `Paused` or `Unresolved`); `progress` what `tern list` shows;
    /// `stage` whether it may still be cancelled.
    MigratingOut {
        destination: String,
        back: Box<State>,
        progress: Option<String>,
        stage: OutStage,
    },
    /// `Go` was sent to `destination` for `migration_id` and not confirmed: the guest stays
    /// paused here until that host says whether it runs it (the resolver asks), or the user
    /// forces a decision. Resuming it here otherwise could run it on two hosts.
    Unresolved {
        destination: String,
        migration_id: String,
    },
    /// Post-copy: `Go` went to `destination` for `migration_id`; the guest runs there and
    /// this host, its copy paused, sends it the pages it lacks. `progress`: what `tern list`
    /// shows.
    PostcopyOut {
        destination: String,
        migration_id: String,
        progress: Option<String>,
    },
    /// Post-copy to `destination` failed after the guest ran there: its guest process ended
    /// (`reason`) before every page had arrived, so the guest's state since the handover is
    /// gone. The paused copy here is its last whole state; only a forced unpause runs it.
    PostcopyLost {
        destination: String,
        migration_id: String,
        reason: String,
    },
    /// The guest is arriving from `source`; nothing runs here before the source says `Go`.
    Incoming { source: String },
    /// Post-copy from `source`: the guest runs here while the rest of its pages arrive.
    PostcopyIn { source: String },
    /// The process is ending: destroyed, saved, migrated away, powered off, crashed, or an
    /// incoming migration gave up. Absorbs every outcome; refuses every request but destroy.
    Ending,
}

/// Where an outgoing migration is with respect to its commit point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutStage {
    /// Sending the guest: it is still this host's, and a cancel is accepted.
    Sending,
    /// Cancelled on request: the engine gives up at its next check and may not pass the
    /// commit point.
    Cancelling,
    /// Past the commit point (`Go` is going out): the guest is the destination's; a cancel is
    /// refused. (A post-copy migration goes on in [`State::PostcopyOut`], where a cancel is
    /// refused too: [`POSTCOPY_REFUSAL`].)
    HandingOver,
}

/// Why a migration in post-copy cannot be cancelled.
pub(crate) const POSTCOPY_REFUSAL: &str = "cancel is refused during post-copy: the guest runs on \
     the destination and its memory is split between the hosts";

/// Why the engine may not pass the commit point after a cancel (the engine's reason for
/// giving up).
pub(crate) const CANCELLED_ON_REQUEST: &str = "cancelled on request";

/// A request, or the outcome of a long operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Pause,
    /// `force`: also from `Unresolved` (stops asking the destination).
    Unpause {
        force: bool,
    },
    PowerButton,
    Save {
        path: String,
    },
    /// The checkpoint is complete; the guest runs on (as before the save) if `keep_running`.
    Saved {
        keep_running: bool,
    },
    SaveFailed,
    /// `force`: also from `Unresolved`.
    Migrate {
        destination: String,
        force: bool,
    },
    /// Cancel the outgoing migration (`tern migrate --cancel`, or Ctrl-C on `tern migrate`).
    CancelMigration,
    /// The engine reached the commit point and asks to hand the guest over.
    CommitPoint,
    /// The destination confirmed it runs the guest.
    Migrated,
    /// The migration failed before the commit point; the guest is here as before.
    MigrationFailed,
    /// `Go` went out and no confirmation came.
    MigrationUnresolved {
        migration_id: String,
    },
    /// Post-copy: `Go` went out for `migration_id`; this host now serves the guest's pages.
    PostcopyStarted {
        migration_id: String,
    },
    /// Post-copy: the destination's guest process ended before every page arrived.
    PostcopyLost {
        reason: String,
    },
    /// The destination of `migration_id` answered: it runs the guest (`committed`) or never
    /// will.
    Resolved {
        migration_id: String,
        committed: bool,
    },
    /// `Go` arrived for an incoming guest; it runs if `resume`.
    IncomingCommitted {
        resume: bool,
    },
    IncomingAborted,
    /// `Go` arrived for a post-copy migration: the guest runs while its pages arrive.
    IncomingPostcopy,
    /// Every page of a post-copy migration arrived.
    PostcopyArrived,
    Destroy,
    /// The guest powered off, reset or crashed.
    GuestEnded,
}

/// The table: the state after `event` in `state`, or why `event` is refused. `name` is the
/// guest's, for the messages.
pub(crate) fn next(state: &State, event: &Event, name: &str) -> Result<State, String> {
    use Event as E;
    use State as S;
    let refused = || Err(refusal(state, event, name));
    match (state, event) {
        // Destroy always wins; the guest's own end too.
        (_, E::Destroy | E::GuestEnded) => Ok(S::Ending),
        // Ending absorbs the outcomes of whatever was under way.
        (
            S::Ending,
            E::Saved { .. }
            | E::SaveFailed
            | E::Migrated
            | E::MigrationFailed
            | E::MigrationUnresolved { .. }
            | E::PostcopyStarted { .. }
            | E::PostcopyLost { .. }
            | E::IncomingCommitted { .. }
            | E::IncomingAborted
            | E::IncomingPostcopy
            | E::PostcopyArrived,
        ) => Ok(S::Ending),

        (S::Running | S::Paused, E::Pause) => Ok(S::Paused),
        (S::Unresolved { .. } | S::PostcopyLost { .. }, E::Pause) => Ok(state.clone()),
        (S::Running | S::Paused, E::Unpause { .. }) => Ok(S::Running),
        (
            S::Unresolved { .. } | S::PostcopyOut { .. } | S::PostcopyLost { .. },
            E::Unpause { force: true },
        ) => Ok(S::Running),
        (S::Running | S::Paused, E::PowerButton) => Ok(state.clone()),

        (S::Running | S::Paused, E::Save { path }) => Ok(S::Saving {
            path: path.clone(),
            resume: *state == S::Running,
        }),
        (S::Saving { resume, .. }, E::Saved { keep_running: true } | E::SaveFailed) => {
            Ok(if *resume { S::Running } else { S::Paused })
        }
        (
            S::Saving { .. },
            E::Saved {
                keep_running: false,
            },
        ) => Ok(S::Ending),

        (S::Running | S::Paused, E::Migrate { destination, .. })
        | (
            S::Unresolved { .. } | S::PostcopyLost { .. },
            E::Migrate {
                destination,
                force: true,
            },
        ) => Ok(S::MigratingOut {
            destination: destination.clone(),
            back: Box::new(state.clone()),
            progress: None,
            stage: OutStage::Sending,
        }),
        (
            S::MigratingOut {
                stage: OutStage::Sending | OutStage::Cancelling,
                ..
            },
            E::CancelMigration,
        ) => Ok(with_stage(state, OutStage::Cancelling)),
        (
            S::MigratingOut {
                stage: OutStage::Sending,
                ..
            },
            E::CommitPoint,
        ) => Ok(with_stage(state, OutStage::HandingOver)),
        (S::MigratingOut { .. } | S::PostcopyOut { .. }, E::Migrated) => Ok(S::Ending),
        (
            S::MigratingOut {
                destination,
                stage: OutStage::HandingOver,
                ..
            },
            E::PostcopyStarted { migration_id },
        ) => Ok(S::PostcopyOut {
            destination: destination.clone(),
            migration_id: migration_id.clone(),
            progress: None,
        }),
        // The destination never ran it: it resumed here.
        (S::PostcopyOut { .. }, E::MigrationFailed) => Ok(S::Running),
        (
            S::PostcopyOut {
                destination,
                migration_id,
                ..
            },
            E::PostcopyLost { reason },
        ) => Ok(S::PostcopyLost {
            destination: destination.clone(),
            migration_id: migration_id.clone(),
            reason: reason.clone(),
        }),
        (S::MigratingOut { back, .. }, E::MigrationFailed) => Ok((**back).clone()),
        (S::MigratingOut { destination, .. }, E::MigrationUnresolved { migration_id }) => {
            Ok(S::Unresolved {
                destination: destination.clone(),
                migration_id: migration_id.clone(),
            })
        }
        (
            S::Unresolved {
                migration_id: pending,
                ..
            },
            E::Resolved {
                migration_id,
                committed,
            },
        ) if pending == migration_id => Ok(if *committed { S::Ending } else { S::Running }),

        (S::Incoming { .. }, E::IncomingCommitted { resume }) => {
            Ok(if *resume { S::Running } else { S::Paused })
        }
        (S::Incoming { .. }, E::IncomingAborted) => Ok(S::Ending),
        (S::Incoming { source }, E::IncomingPostcopy) => Ok(S::PostcopyIn {
            source: source.clone(),
        }),
        (S::PostcopyIn { .. }, E::PostcopyArrived) => Ok(S::Running),

        _ => refused(),
    }
}

/// `state` (an outgoing migration) at `stage`.
fn with_stage(state: &State, stage: OutStage) -> State {
    let mut next = state.clone();
    if let State::MigratingOut { stage: s, .. } = &mut next {
        *s = stage;
    }
    next
}

/// Why `event` cannot happen in `state`, in the user's terms.
fn refusal(state: &State, event: &Event, name: &str) -> String {
    match (state, event) {
        (State::MigratingOut { destination, .. }, Event::CancelMigration) => format!(
            "too late to cancel the migration of '{name}': it is past its commit point (the \
             handover to {destination} has begun), so the guest is already {destination}'s"
        ),
        (State::PostcopyOut { .. }, Event::CancelMigration) => POSTCOPY_REFUSAL.to_string(),
        (State::MigratingOut { .. }, Event::CommitPoint) => CANCELLED_ON_REQUEST.to_string(),
        (State::Unresolved { destination, .. }, Event::CancelMigration) => format!(
            "'{name}' is not migrating: its migration to {destination} is past its commit point \
             and unresolved (the guest stays paused here until {destination} says whether it \
             runs it), so there is nothing to cancel"
        ),
        (State::Incoming { source }, Event::CancelMigration) => format!(
            "'{name}' is arriving from {source}, not leaving: cancel its migration there \
             (tern migrate --cancel on {source})"
        ),
        (State::Running | State::Paused | State::Saving { .. }, Event::CancelMigration) => {
            format!("'{name}' is not migrating")
        }
        (State::Saving { .. }, _) => format!("'{name}' is being saved"),
        (State::MigratingOut { destination, .. }, Event::Migrate { .. }) => {
            format!("'{name}' is already migrating (to {destination})")
        }
        (State::MigratingOut { destination, .. }, _) => {
            format!("'{name}' is migrating to {destination}")
        }
        (State::Unresolved { destination, .. }, _) => {
            let what = format!(
                "the migration of '{name}' to {destination} is unresolved: the guest stays \
                 paused here until {destination} says whether it runs it"
            );
            let risk = format!("the guest may then run on two hosts if {destination} also runs it");
            match event {
                Event::Unpause { .. } => {
                    format!("{what}; use --force to run it here anyway ({risk})")
                }
                Event::Migrate { .. } => {
                    format!("{what}; use --force to migrate it anyway ({risk})")
                }
                _ => what,
            }
        }
        (
            State::PostcopyOut {
                destination,
                migration_id: _,
                progress: _,
            },
            _,
        ) => {
            let what = format!(
                "'{name}' runs on {destination} now; this host is sending it the rest of its \
                 memory (post-copy)"
            );
            match event {
                Event::Unpause { .. } => format!(
                    "{what}; only if {destination} is gone for good, `tern unpause --force \
                     {name}` runs the copy here (its state since the handover is lost then)"
                ),
                _ => what,
            }
        }
        (State::PostcopyLost { destination, .. }, _) => {
            let what = format!(
                "'{name}' was lost on {destination} during post-copy: the paused copy here is \
                 its last whole state, from the handover"
            );
            match event {
                Event::Unpause { .. } => {
                    format!("{what}; use --force to run it (its disks may have moved on since)")
                }
                Event::Migrate { .. } => format!("{what}; use --force to migrate it anyway"),
                _ => what,
            }
        }
        (State::Incoming { source }, _) => format!("'{name}' is still arriving from {source}"),
        (State::PostcopyIn { source }, _) => {
            format!("'{name}' is still receiving its memory from {source} (post-copy)")
        }
        (State::Ending, _) => format!("'{name}' is ending"),
        // Outcomes that do not belong to the state: a bug, or a resolver whose question the
        // user already answered.
        (State::Running | State::Paused, _) => {
            format!("'{name}' is not in a state where {event:?} can happen")
        }
    }
}

/// The controller: the one place the state changes.
pub(crate) struct Lifecycle {
    name: String,
    state: Mutex<State>,
}

impl Lifecycle {
    pub fn new(name: &str, initial: State) -> Lifecycle {
        Lifecycle {
            name: name.to_string(),
            state: Mutex::new(initial),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to the state `event` leads to, atomically; returns the state before it. A refused
    /// event changes nothing.
    pub fn apply(&self, event: Event) -> Result<State, String> {
        let mut state = self.lock();
        let after = next(&state, &event, &self.name)?;
        if after != *state {
            log::info!("{:?} -> {:?} on {event:?}", *state, after);
        }
        Ok(std::mem::replace(&mut *state, after))
    }

    /// The current state (a copy: it may change as soon as the lock is released).
    pub fn state(&self) -> State {
        self.lock().clone()
    }

    /// Whether the user cancelled the outgoing migration under way (it gives up).
    pub fn cancel_requested(&self) -> bool {
        matches!(
            *self.lock(),
            State::MigratingOut {
                stage: OutStage::Cancelling,
                ..
            }
        )
    }

    /// Whether the process is ending (a migration or save under way gives up).
    pub fn ending(&self) -> bool {
        *self.lock() == State::Ending
    }

    /// What the machine should be doing when no long operation owns it: `Some(true)` run,
    /// `Some(false)` stay paused, `None` leave it to the operation under way.
    pub fn wants_running(&self) -> Option<bool> {
        match *self.lock() {
            State::Running => Some(true),
            State::Paused | State::Unresolved { .. } | State::PostcopyLost { .. } => Some(false),
            _ => None,
        }
    }

    /// Whether this host still serves post-copy migration `migration_id` (its source side).
    pub fn serving_postcopy(&self, migration_id: &str) -> bool {
        matches!(&*self.lock(), State::PostcopyOut { migration_id: id, .. } if id == migration_id)
    }

    /// Whether the guest is receiving its memory in post-copy here.
    pub fn receiving_postcopy(&self) -> bool {
        matches!(&*self.lock(), State::PostcopyIn { .. })
    }

    /// What the resolver of `migration_id` should do now.
    pub fn resolver_step(&self, migration_id: &str) -> ResolverStep {
        match &*self.lock() {
            State::Unresolved {
                migration_id: id, ..
            } if id == migration_id => ResolverStep::Ask,
            // A forced migration is under way; if it fails, the question is open again.
            State::MigratingOut { back, .. } if matches!(&**back, State::Unresolved { migration_id: id, .. } if id == migration_id) => {
                ResolverStep::Wait
            }
            _ => ResolverStep::Stop,
        }
    }

    /// Progress of a migration under way, for `tern list`.
    pub fn set_progress(&self, text: String) {
        match &mut *self.lock() {
            State::MigratingOut { progress, .. } | State::PostcopyOut { progress, .. } => {
                *progress = Some(text)
            }
            _ => {}
        }
    }

    /// The run state and note `status` reports; `busy`: the vCPUs used a good part of a CPU
    /// lately.
    pub fn report(&self, busy: bool) -> (VmmRunState, Option<String>) {
        match &*self.lock() {
            State::Running if busy => (VmmRunState::Running, None),
            State::Running => (VmmRunState::Blocked, None),
            State::Paused => (VmmRunState::Paused, None),
            State::Saving { path, .. } => (VmmRunState::Saving, Some(format!("saving to {path}"))),
            State::MigratingOut {
                destination,
                stage: OutStage::Cancelling,
                ..
            } => (
                VmmRunState::Migrating,
                Some(format!("cancelling the migration to {destination}")),
            ),
            State::MigratingOut {
                destination,
                progress,
                ..
            } => (
                VmmRunState::Migrating,
                Some(
                    progress
                        .clone()
                        .unwrap_or_else(|| format!("migrating to {destination}")),
                ),
            ),
            State::Unresolved { destination, .. } => (
                VmmRunState::Paused,
                Some(format!(
                    "migration to {destination} unresolved: paused here until that host says \
                     whether it runs the guest (tern unpause --force runs it here)"
                )),
            ),
            State::PostcopyOut {
                destination,
                progress,
                ..
            } => (
                VmmRunState::Migrating,
                Some(progress.clone().unwrap_or_else(|| {
                    format!("post-copy: runs on {destination}, which gets the rest of its memory")
                })),
            ),
            State::PostcopyLost {
                destination,
                reason,
                ..
            } => (
                VmmRunState::Paused,
                Some(format!(
                    "lost during post-copy to {destination} ({reason}): paused here, its last \
                     whole copy; tern unpause --force runs it (its disks may have moved on)"
                )),
            ),
            State::Incoming { source } => {
                (VmmRunState::Paused, Some(format!("arriving from {source}")))
            }
            State::PostcopyIn { source } => (
                if busy {
                    VmmRunState::Running
                } else {
                    VmmRunState::Blocked
                },
                Some(format!("receiving its memory from {source} (post-copy)")),
            ),
            State::Ending => (VmmRunState::Paused, Some("ending".into())),
        }
    }
}

/// See [`Lifecycle::resolver_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResolverStep {
    /// Ask the destination.
    Ask,
    /// Do not ask now, do not give up.
    Wait,
    /// The question is answered or no longer asked.
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unresolved() -> State {
        State::Unresolved {
            destination: "10.0.0.2:8002".into(),
            migration_id: "m1".into(),
        }
    }

    fn migrate(force: bool) -> Event {
        Event::Migrate {
            destination: "10.0.0.3:8002".into(),
            force,
        }
    }

    fn step(state: &State, event: Event) -> Result<State, String> {
        next(state, &event, "web")
    }

    #[test]
    fn pause_and_unpause() {
        assert_eq!(step(&State::Running, Event::Pause), Ok(State::Paused));
        assert_eq!(step(&State::Paused, Event::Pause), Ok(State::Paused));
        assert_eq!(
            step(&State::Paused, Event::Unpause { force: false }),
            Ok(State::Running)
        );
        let saving = step(&State::Running, Event::Save { path: "/f".into() }).unwrap();
        assert_eq!(
            step(&saving, Event::Pause),
            Err("'web' is being saved".into())
        );
    }

    #[test]
    fn of_two_migrations_one_starts() {
        let migrating = step(&State::Running, migrate(false)).unwrap();
        let err = step(&migrating, migrate(false)).unwrap_err();
        assert!(err.starts_with("'web' is already migrating"), "{err}");
        let err = step(&migrating, Event::Pause).unwrap_err();
        assert_eq!(err, "'web' is migrating to 10.0.0.3:8002");
        assert_eq!(step(&migrating, Event::MigrationFailed), Ok(State::Running));
        assert_eq!(step(&migrating, Event::Migrated), Ok(State::Ending));
    }

    #[test]
    fn a_migration_is_cancelled_before_its_commit_point_only() {
        let migrating = step(&State::Paused, migrate(false)).unwrap();
        let cancelling = step(&migrating, Event::CancelMigration).unwrap();
        assert!(matches!(
            cancelling,
            State::MigratingOut {
                stage: OutStage::Cancelling,
                ..
            }
        ));
        // Asked twice, still one cancel; the engine may no longer hand the guest over.
        assert_eq!(
            step(&cancelling, Event::CancelMigration),
            Ok(cancelling.clone())
        );
        assert_eq!(
            step(&cancelling, Event::CommitPoint),
            Err(CANCELLED_ON_REQUEST.into())
        );
        // It gives up: the guest is as before the migration.
        assert_eq!(step(&cancelling, Event::MigrationFailed), Ok(State::Paused));

        // Past the commit point a cancel is refused, saying why.
        let handing_over = step(&migrating, Event::CommitPoint).unwrap();
        let err = step(&handing_over, Event::CancelMigration).unwrap_err();
        assert!(err.starts_with("too late to cancel"), "{err}");
        assert!(err.contains("already 10.0.0.3:8002's"), "{err}");
        assert_eq!(step(&handing_over, Event::Migrated), Ok(State::Ending));
        let post_copy = step(
            &handing_over,
            Event::PostcopyStarted {
                migration_id: "m1".into(),
            },
        )
        .unwrap();
        assert_eq!(
            step(&post_copy, Event::CancelMigration),
            Err(POSTCOPY_REFUSAL.into())
        );

        // Nothing to cancel.
        for state in [State::Running, State::Paused] {
            assert_eq!(
                step(&state, Event::CancelMigration),
                Err("'web' is not migrating".into())
            );
        }
        let err = step(&unresolved(), Event::CancelMigration).unwrap_err();
        assert!(err.starts_with("'web' is not migrating: "), "{err}");
        let incoming = State::Incoming {
            source: "10.0.0.1".into(),
        };
        let err = step(&incoming, Event::CancelMigration).unwrap_err();
        assert!(err.contains("cancel its migration there"), "{err}");

        let life = Lifecycle::new("web", State::Running);
        life.apply(migrate(false)).unwrap();
        assert!(!life.cancel_requested());
        life.apply(Event::CancelMigration).unwrap();
        assert!(life.cancel_requested());
        let (_, note) = life.report(true);
        assert_eq!(
            note.as_deref(),
            Some("cancelling the migration to 10.0.0.3:8002")
        );
    }

    #[test]
    fn an_unresolved_guest_stays_paused_unless_forced() {
        let u = unresolved();
        for event in [Event::Unpause { force: false }, migrate(false)] {
            let err = step(&u, event).unwrap_err();
            assert!(err.contains("is unresolved"), "{err}");
            assert!(err.contains("--force"), "{err}");
            assert!(err.contains("two hosts"), "{err}");
        }
        assert!(step(&u, Event::Save { path: "/f".into() }).is_err());
        assert!(step(&u, Event::PowerButton).is_err());
        assert_eq!(step(&u, Event::Pause), Ok(u.clone()));
        assert_eq!(step(&u, Event::Unpause { force: true }), Ok(State::Running));

        // A forced migration that fails leaves the question open again.
        let forced = step(&u, migrate(true)).unwrap();
        assert_eq!(step(&forced, Event::MigrationFailed), Ok(u.clone()));
    }

    #[test]
    fn the_resolver_decides_only_its_own_question() {
        let u = unresolved();
        let answer = |id: &str, committed| Event::Resolved {
            migration_id: id.into(),
            committed,
        };
        assert_eq!(step(&u, answer("m1", true)), Ok(State::Ending));
        assert_eq!(step(&u, answer("m1", false)), Ok(State::Running));
        assert!(step(&u, answer("m0", false)).is_err());
        // The user ran the guest here first: the answer no longer applies.
        assert!(step(&State::Running, answer("m1", false)).is_err());

        let life = Lifecycle::new("web", u.clone());
        assert_eq!(life.resolver_step("m1"), ResolverStep::Ask);
        life.apply(migrate(true)).unwrap();
        assert_eq!(life.resolver_step("m1"), ResolverStep::Wait);
        life.apply(Event::MigrationUnresolved {
            migration_id: "m2".into(),
        })
        .unwrap();
        assert_eq!(life.resolver_step("m1"), ResolverStep::Stop);
        assert_eq!(life.resolver_step("m2"), ResolverStep::Ask);
    }

    #[test]
    fn saves_return_to_where_they_started() {
        for (before, resume) in [(State::Running, true), (State::Paused, false)] {
            let saving = step(&before, Event::Save { path: "/f".into() }).unwrap();
            assert_eq!(
                saving,
                State::Saving {
                    path: "/f".into(),
                    resume
                }
            );
            assert_eq!(step(&saving, Event::SaveFailed), Ok(before.clone()));
            assert_eq!(
                step(&saving, Event::Saved { keep_running: true }),
                Ok(before.clone())
            );
            assert_eq!(
                step(
                    &saving,
                    Event::Saved {
                        keep_running: false
                    }
                ),
                Ok(State::Ending)
            );
            assert!(step(&saving, migrate(true)).is_err());
        }
    }

    fn postcopy_out() -> State {
        State::PostcopyOut {
            destination: "10.0.0.2:8002".into(),
            migration_id: "m1".into(),
            progress: None,
        }
    }

    #[test]
    fn post_copy_out_serves_until_the_pages_arrived_or_the_guest_is_lost() {
        let migrating = step(&State::Running, migrate(false)).unwrap();
        let started = Event::PostcopyStarted {
            migration_id: "m1".into(),
        };
        assert!(
            step(&migrating, started.clone()).is_err(),
            "before the commit point"
        );
        let handing_over = step(&migrating, Event::CommitPoint).unwrap();
        let out = step(
            &handing_over,
            Event::PostcopyStarted {
                migration_id: "m1".into(),
            },
        )
        .unwrap();
        assert_eq!(
            out,
            State::PostcopyOut {
                destination: "10.0.0.3:8002".into(),
                migration_id: "m1".into(),
                progress: None
            }
        );
        for event in [
            Event::Pause,
            Event::Save { path: "/f".into() },
            migrate(true),
        ] {
            let err = step(&out, event).unwrap_err();
            assert!(err.contains("post-copy"), "{err}");
        }
        let err = step(&out, Event::Unpause { force: false }).unwrap_err();
        assert!(err.contains("--force"), "{err}");
        assert_eq!(
            step(&out, Event::CancelMigration),
            Err(POSTCOPY_REFUSAL.into())
        );
        assert_eq!(step(&out, Event::Migrated), Ok(State::Ending));
        assert_eq!(step(&out, Event::MigrationFailed), Ok(State::Running));
        assert_eq!(
            step(&out, Event::Unpause { force: true }),
            Ok(State::Running)
        );
        let life = Lifecycle::new("web", out.clone());
        assert!(life.serving_postcopy("m1") && !life.serving_postcopy("m0"));
        assert_eq!(life.wants_running(), None);
    }

    #[test]
    fn a_guest_lost_in_post_copy_runs_again_only_by_force() {
        let lost = step(
            &postcopy_out(),
            Event::PostcopyLost {
                reason: "its guest process died".into(),
            },
        )
        .unwrap();
        assert!(matches!(lost, State::PostcopyLost { .. }));
        let err = step(&lost, Event::Unpause { force: false }).unwrap_err();
        assert!(err.contains("--force") && err.contains("disks"), "{err}");
        assert!(step(&lost, migrate(false)).is_err());
        assert!(step(&lost, Event::Save { path: "/f".into() }).is_err());
        assert_eq!(step(&lost, Event::Pause), Ok(lost.clone()));
        assert_eq!(
            step(&lost, Event::Unpause { force: true }),
            Ok(State::Running)
        );
        let life = Lifecycle::new("web", lost.clone());
        assert_eq!(life.wants_running(), Some(false));
        let (state, note) = life.report(false);
        assert_eq!(state, VmmRunState::Paused);
        let note = note.unwrap();
        assert!(
            note.contains("lost during post-copy") && note.contains("--force"),
            "{note}"
        );
    }

    #[test]
    fn post_copy_in_runs_the_guest_and_refuses_the_rest() {
        let incoming = State::Incoming {
            source: "10.0.0.1".into(),
        };
        let pc = step(&incoming, Event::IncomingPostcopy).unwrap();
        assert_eq!(
            pc,
            State::PostcopyIn {
                source: "10.0.0.1".into()
            }
        );
        for event in [
            Event::Pause,
            migrate(true),
            Event::Save { path: "/f".into() },
        ] {
            let err = step(&pc, event).unwrap_err();
            assert!(err.contains("receiving its memory"), "{err}");
        }
        assert_eq!(step(&pc, Event::PostcopyArrived), Ok(State::Running));
        assert_eq!(step(&pc, Event::Destroy), Ok(State::Ending));
        let life = Lifecycle::new("web", pc);
        assert!(life.receiving_postcopy());
        assert_eq!(life.report(true).0, VmmRunState::Running);
    }

    #[test]
    fn incoming_and_ending() {
        let incoming = State::Incoming {
            source: "10.0.0.1".into(),
        };
        assert_eq!(
            step(&incoming, Event::Pause),
            Err("'web' is still arriving from 10.0.0.1".into())
        );
        assert_eq!(
            step(&incoming, Event::IncomingCommitted { resume: true }),
            Ok(State::Running)
        );
        assert_eq!(step(&incoming, Event::IncomingAborted), Ok(State::Ending));
        assert_eq!(step(&incoming, Event::Destroy), Ok(State::Ending));
        // Destroy wins over everything, and the outcomes of what was under way are absorbed.
        assert_eq!(step(&State::Ending, Event::Destroy), Ok(State::Ending));
        assert_eq!(
            step(&State::Ending, Event::Saved { keep_running: true }),
            Ok(State::Ending)
        );
        assert_eq!(
            step(&State::Ending, Event::Unpause { force: true }),
            Err("'web' is ending".into())
        );
    }
}
