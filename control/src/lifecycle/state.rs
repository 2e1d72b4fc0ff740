//! The sandbox state machine, as a pure transition table.
//!
//! ```text
//!            placed            pause / timeout(auto-pause)
//! creating ─────────▶ running ───────────────────────────▶ paused
//!    │                 │  ▲                                  │
//!    │ placement       │  └──────────── resume ──────────────┘
//!    │ failed          │ kill / timeout
//!    ▼                 ▼
//!  killed ◀─────── (kill from any live state, including lost)
//!
//!  creating/running/paused ── host lost ──▶ lost ── worker reports it again ──▶ running
//!                                                   (or paused, as the worker reports it)
//! ```
//!
//! Everything that changes a sandbox's state asks [`transition`] first and then writes the
//! result with a compare-and-set on the old state, so two racing requests cannot both win.

use std::fmt;
use std::str::FromStr;

/// Where a sandbox is in its life.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Paused,
    Killed,
    Lost,
}

/// What happened to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A worker started it.
    Placed,
    /// No worker could start it.
    PlacementFailed,
    /// A user or API key asked to pause it.
    Pause,
    /// A user or API key asked to resume it (also `connect` on a paused sandbox).
    Resume,
    /// A user or API key asked to kill it.
    Kill,
    /// Its timeout passed; the sandbox is killed or paused as its `auto_pause` says.
    TimedOut { auto_pause: bool },
    /// Its host stopped answering.
    HostLost,
    /// A lost sandbox's host came back and reported it running.
    Reappeared,
    /// A lost sandbox's host came back and reported it paused (its snapshot survived).
    ReappearedPaused,
}

/// The event does not apply in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply {event:?} to a sandbox that is {from}")]
pub struct InvalidTransition {
    pub from: SandboxState,
    pub event: Event,
}

/// The state after `event`, or why it does not apply.
pub fn transition(from: SandboxState, event: Event) -> Result<SandboxState, InvalidTransition> {
    use Event as E;
    use SandboxState as S;
    let to = match (from, event) {
        (S::Creating, E::Placed) => S::Running,
        (S::Creating, E::PlacementFailed) => S::Killed,
        (S::Running, E::Pause) => S::Paused,
        (S::Running, E::TimedOut { auto_pause: true }) => S::Paused,
        (S::Running, E::TimedOut { auto_pause: false }) => S::Killed,
        (S::Paused, E::Resume) => S::Running,
        (S::Creating | S::Running | S::Paused | S::Lost, E::Kill) => S::Killed,
        (S::Creating | S::Running | S::Paused, E::HostLost) => S::Lost,
        (S::Lost, E::Reappeared) => S::Running,
        (S::Lost, E::ReappearedPaused) => S::Paused,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

impl SandboxState {
    pub const ALL: [Self; 5] = [
        Self::Creating,
        Self::Running,
        Self::Paused,
        Self::Killed,
        Self::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Killed => "killed",
            Self::Lost => "lost",
        }
    }

    /// A killed sandbox is gone for good; every other state may still change.
    pub fn is_terminal(self) -> bool {
        self == Self::Killed
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no sandbox state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sandbox state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for SandboxState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use SandboxState as S;

    const EVENTS: [Event; 10] = [
        E::Placed,
        E::PlacementFailed,
        E::Pause,
        E::Resume,
        E::Kill,
        E::TimedOut { auto_pause: true },
        E::TimedOut { auto_pause: false },
        E::HostLost,
        E::Reappeared,
        E::ReappearedPaused,
    ];

    #[test]
    fn happy_path_create_pause_resume_kill() {
        let s = transition(S::Creating, E::Placed).unwrap();
        assert_eq!(s, S::Running);
        let s = transition(s, E::Pause).unwrap();
        assert_eq!(s, S::Paused);
        let s = transition(s, E::Resume).unwrap();
        assert_eq!(s, S::Running);
        assert_eq!(transition(s, E::Kill).unwrap(), S::Killed);
    }

    #[test]
    fn timeout_kills_or_pauses_as_configured() {
        assert_eq!(
            transition(S::Running, E::TimedOut { auto_pause: false }).unwrap(),
            S::Killed
        );
        assert_eq!(
            transition(S::Running, E::TimedOut { auto_pause: true }).unwrap(),
            S::Paused
        );
        // A paused sandbox has nothing left to time out.
        assert!(transition(S::Paused, E::TimedOut { auto_pause: false }).is_err());
    }

    #[test]
    fn killed_is_terminal_for_every_event() {
        for event in EVENTS {
            assert_eq!(
                transition(S::Killed, event),
                Err(InvalidTransition {
                    from: S::Killed,
                    event
                })
            );
        }
    }

    #[test]
    fn pausing_twice_and_resuming_a_running_sandbox_are_rejected() {
        assert!(transition(S::Paused, E::Pause).is_err());
        assert!(transition(S::Running, E::Resume).is_err());
        assert!(transition(S::Creating, E::Pause).is_err());
    }

    #[test]
    fn lost_sandboxes_can_be_killed_or_reappear() {
        for from in [S::Creating, S::Running, S::Paused] {
            assert_eq!(transition(from, E::HostLost).unwrap(), S::Lost);
        }
        assert_eq!(transition(S::Lost, E::Kill).unwrap(), S::Killed);
        assert_eq!(transition(S::Lost, E::Reappeared).unwrap(), S::Running);
        assert_eq!(transition(S::Lost, E::ReappearedPaused).unwrap(), S::Paused);
        assert!(transition(S::Running, E::ReappearedPaused).is_err());
        assert!(transition(S::Lost, E::Resume).is_err());
    }

    #[test]
    fn table_has_exactly_the_documented_number_of_edges() {
        let allowed = S::ALL
            .into_iter()
            .flat_map(|s| EVENTS.into_iter().map(move |e| (s, e)))
            .filter(|&(s, e)| transition(s, e).is_ok())
            .count();
        assert_eq!(allowed, 15);
    }

    #[test]
    fn names_round_trip() {
        for state in S::ALL {
            assert_eq!(state.as_str().parse::<S>().unwrap(), state);
        }
        assert!("RUNNING".parse::<S>().is_err());
    }
}
