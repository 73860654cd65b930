//! Asset lifecycle: the states an asset can be in and the transitions between them.
//!
//! Pure code: the shard that owns an asset applies these transitions to its registry, and
//! the store records the results. ACTIVE ⇄ SUSPENDED, any non-retired state → RETIRED
//! (terminal); ROTATING exists only while a rotation waits for its commit inside its shard.

/// The state of an asset. The numbers are stored and sent on the wire: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum AssetState {
    Active = 1,
    Rotating = 2,
    Suspended = 3,
    Retired = 4,
}

impl AssetState {
    pub fn from_u8(value: u8) -> Option<AssetState> {
        match value {
            1 => Some(AssetState::Active),
            2 => Some(AssetState::Rotating),
            3 => Some(AssetState::Suspended),
            4 => Some(AssetState::Retired),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AssetState::Active => "ACTIVE",
            AssetState::Rotating => "ROTATING",
            AssetState::Suspended => "SUSPENDED",
            AssetState::Retired => "RETIRED",
        }
    }

    pub fn from_name(name: &str) -> Option<AssetState> {
        [
            AssetState::Active,
            AssetState::Rotating,
            AssetState::Suspended,
            AssetState::Retired,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// Derivation is served in ACTIVE and ROTATING only.
    pub fn allows_derive(self) -> bool {
        matches!(self, AssetState::Active | AssetState::Rotating)
    }
}

impl std::fmt::Display for AssetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A requested change of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A rotation starts: its commit is in flight.
    BeginRotation,
    /// The rotation's commit is durable: the counter has moved forward.
    CompleteRotation,
    /// The rotation's commit failed: nothing changed.
    AbortRotation,
    Suspend,
    Resume,
    Retire,
}

/// Why a transition is not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("asset in state {from} cannot {transition:?}")]
pub struct LifecycleError {
    pub from: AssetState,
    pub transition: Transition,
}

/// Applies `transition` to `from`: the new state, or why not.
pub fn apply(from: AssetState, transition: Transition) -> Result<AssetState, LifecycleError> {
    use AssetState::*;
    use Transition::*;
    let to = match (from, transition) {
        (Active, BeginRotation) => Rotating,
        (Rotating, CompleteRotation) | (Rotating, AbortRotation) => Active,
        (Active, Suspend) => Suspended,
        (Suspended, Resume) => Active,
        (Active | Suspended, Retire) => Retired,
        _ => return Err(LifecycleError { from, transition }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use AssetState::*;
    use Transition::*;

    const STATES: [AssetState; 4] = [Active, Rotating, Suspended, Retired];
    const TRANSITIONS: [Transition; 6] = [
        BeginRotation,
        CompleteRotation,
        AbortRotation,
        Suspend,
        Resume,
        Retire,
    ];

    #[test]
    fn the_whole_transition_table() {
        // Every (state, transition) pair: the allowed ones and, as important, the refused ones.
        let allowed = [
            (Active, BeginRotation, Rotating),
            (Rotating, CompleteRotation, Active),
            (Rotating, AbortRotation, Active),
            (Active, Suspend, Suspended),
            (Suspended, Resume, Active),
            (Active, Retire, Retired),
            (Suspended, Retire, Retired),
        ];
        for from in STATES {
            for t in TRANSITIONS {
                let expected = allowed
                    .iter()
                    .find(|(f, tr, _)| *f == from && *tr == t)
                    .map(|(_, _, to)| *to);
                match expected {
                    Some(to) => assert_eq!(apply(from, t), Ok(to), "{from} {t:?}"),
                    None => assert_eq!(
                        apply(from, t),
                        Err(LifecycleError {
                            from,
                            transition: t
                        }),
                        "{from} {t:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn retired_is_terminal_and_only_active_states_derive() {
        for t in TRANSITIONS {
            assert!(apply(Retired, t).is_err());
        }
        assert!(Active.allows_derive());
        assert!(Rotating.allows_derive());
        assert!(!Suspended.allows_derive());
        assert!(!Retired.allows_derive());
    }

    #[test]
    fn codes_and_names_round_trip() {
        for s in STATES {
            assert_eq!(AssetState::from_u8(s as u8), Some(s));
            assert_eq!(AssetState::from_name(s.name()), Some(s));
        }
        assert_eq!(AssetState::from_u8(0), None);
        assert_eq!(AssetState::from_u8(5), None);
    }
}
