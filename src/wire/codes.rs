//! The codes on the wire, one table each: opcodes (with who may send each), statuses
//! (with whether each closes the connection), seal states (with whether each serves) and
//! seal providers. docs/protocol.md lists the same numbers; the tests pin them.

/// One enum of protocol codes from one list of rows: each variant with its number and its
/// stable name, `ALL` in the order written, and the number → variant lookup. Every table of
/// codes on the wire (opcodes, statuses, seal states, providers) is written this way, so a
/// row added is in the enum, the lookup, the names and `ALL` at once, and two rows with one
/// number do not compile (rustls's `enum_builder!` is the model). A table may carry one
/// more column, a value of each row, read through a method of its own.
macro_rules! code_table {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ident, from $from:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $code, )+
        }

        impl $name {
            /// Every code, in the table's order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The code with this number, if any.
            pub fn $from(value: $repr) -> Option<$name> {
                match value {
                    $( $code => Some($name::$variant), )+
                    _ => None,
                }
            }

            /// The stable name: CLI output, JSON, logs and metrics labels.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ident, from $from:ident,
        $(#[$fmeta:meta])* $field:ident -> $fty:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal => $label:literal, $value:expr; )+
        }
    ) => {
        code_table! {
            $(#[$meta])*
            pub enum $name: $repr, from $from {
                $( $(#[$vmeta])* $variant = $code => $label, )+
            }
        }

        impl $name {
            $(#[$fmeta])*
            pub fn $field(self) -> $fty {
                match self {
                    $( $name::$variant => $value, )+
                }
            }
        }
    };
}

/// Who may send an operation: the policy's first check, before any field is read
/// (`policy::AccessPolicy::authorize`). DERIVE's purposes, regions and asset groups are
/// checked once its fields are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Any authenticated client (HELLO, SEAL_STATUS).
    Anyone,
    /// Any identity that holds a role (REGIONS).
    AnyRole,
    /// An operator (REGISTER, ROTATE, SUSPEND, RESUME).
    Operator,
    /// An admin (SEAL, UNSEAL, RETIRE, SET_REGION, POLICY_RELOAD).
    Admin,
    /// A reader of the registry and the log: auditor, operator or admin (STATUS,
    /// RECONCILE, PROVE_RECEIPT, LIST_ASSETS).
    Reader,
    /// A deriver of the request's purpose, region and asset group (DERIVE).
    Deriver,
}

code_table! {
    /// Request opcodes. Numbers are never reused; later issues add operations above 0x11.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Opcode: u8, from from_u8,
        /// Who may send it: the policy's first check.
        gate -> Gate {
        Hello = 0x01 => "HELLO", Gate::Anyone;
        Register = 0x02 => "REGISTER", Gate::Operator;
        Derive = 0x03 => "DERIVE", Gate::Deriver;
        Status = 0x04 => "STATUS", Gate::Reader;
        /// Admin: drop the unsealed seed at once.
        Seal = 0x05 => "SEAL", Gate::Admin;
        /// Admin: submit a Shamir share, or ask the HSM provider to unseal now.
        Unseal = 0x06 => "UNSEAL", Gate::Admin;
        /// The appliance's seal state (any authenticated client).
        SealStatus = 0x07 => "SEAL_STATUS", Gate::Anyone;
        /// Operator: move an asset's counter forward by one (idempotent by rotation id).
        Rotate = 0x08 => "ROTATE", Gate::Operator;
        /// Operator: stop derivations of an asset.
        Suspend = 0x09 => "SUSPEND", Gate::Operator;
        /// Operator: serve a suspended asset again.
        Resume = 0x0A => "RESUME", Gate::Operator;
        /// Admin: retire an asset for good (it answers only STATUS afterwards).
        Retire = 0x0B => "RETIRE", Gate::Admin;
        /// Admin: enable or disable a compliance region (durable, audited).
        SetRegion = 0x0C => "SET_REGION", Gate::Admin;
        /// Any role: the configured regions and whether each is enabled.
        Regions = 0x0D => "REGIONS", Gate::AnyRole;
        /// Admin: re-read the configuration file and put its `[policy]` in force (as SIGHUP).
        PolicyReload = 0x0E => "POLICY_RELOAD", Gate::Admin;
        /// Auditor: reconcile the audit log now (incremental, or full) and report.
        Reconcile = 0x0F => "RECONCILE", Gate::Reader;
        /// Auditor: prove a receipt (shard, seq, hash) is in the log, under a checkpoint.
        ProveReceipt = 0x10 => "PROVE_RECEIPT", Gate::Reader;
        /// Auditor or operator: a page of the registered assets, by asset id.
        ListAssets = 0x11 => "LIST_ASSETS", Gate::Reader;
    }
}

code_table! {
    /// Client-visible statuses. The numbers are part of the protocol: never renumber, never
    /// reuse a retired number (docs/protocol.md keeps the table).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum Status: u16, from from_u16,
        /// A framing error or a connection-level refusal: the appliance answers once and
        /// closes the connection.
        closes_connection -> bool {
        Ok = 0 => "OK", false;
        UnsupportedVersion = 1 => "UNSUPPORTED_VERSION", true;
        MalformedFrame = 2 => "MALFORMED_FRAME", true;
        FrameTooLarge = 3 => "FRAME_TOO_LARGE", true;
        UnknownOpcode = 4 => "UNKNOWN_OPCODE", false;
        BadBody = 5 => "BAD_BODY", false;
        /// A frame whose first byte arrived did not arrive whole within
        /// `limits.frame_timeout_ms`; the connection closes.
        FrameTimeout = 6 => "FRAME_TIMEOUT", true;
        InvalidAssetId = 10 => "INVALID_ASSET_ID", false;
        InvalidPath = 11 => "INVALID_PATH", false;
        InvalidRegion = 12 => "INVALID_REGION", false;
        InvalidPurpose = 13 => "INVALID_PURPOSE", false;
        InvalidTtl = 14 => "INVALID_TTL", false;
        /// ROTATE: the rotation id is not an RFC 4122 UUID.
        InvalidRotationId = 15 => "INVALID_ROTATION_ID", false;
        /// DERIVE in a configured region that an admin disabled.
        RegionDisabled = 16 => "REGION_DISABLED", false;
        UnknownAsset = 20 => "UNKNOWN_ASSET", false;
        AssetExists = 21 => "ASSET_EXISTS", false;
        AssetSuspended = 22 => "ASSET_SUSPENDED", false;
        AssetRetired = 23 => "ASSET_RETIRED", false;
        /// ROTATE with an expected counter that is not the asset's counter (compare-and-set).
        CounterMismatch = 24 => "COUNTER_MISMATCH", false;
        /// ROTATE: the rotation id was already used for another asset.
        RotationIdReused = 25 => "ROTATION_ID_REUSED", false;
        /// ROTATE: the counter is at its largest value (2^63-1) and cannot move forward.
        CounterExhausted = 26 => "COUNTER_EXHAUSTED", false;
        /// SUSPEND / RESUME / RETIRE from a state that does not allow it.
        InvalidTransition = 27 => "INVALID_TRANSITION", false;
        Busy = 30 => "BUSY", false;
        StoreUnavailable = 31 => "STORE_UNAVAILABLE", false;
        Sealed = 32 => "SEALED", false;
        ShuttingDown = 33 => "SHUTTING_DOWN", false;
        /// A connection-level refusal (request id 0): the connection would exceed a bound of
        /// its core, identity or role; the connection closes.
        ConnectionLimit = 34 => "CONNECTION_LIMIT", true;
        /// This appliance is a standby (or an active that could not renew its lease): it
        /// acknowledges nothing. The reply names the active's client address when known;
        /// the request was not run, so any request may be sent there (or to the next
        /// endpoint) as it is.
        NotActive = 35 => "NOT_ACTIVE", false;
        Forbidden = 40 => "FORBIDDEN", false;
        RateLimited = 41 => "RATE_LIMITED", false;
        Internal = 50 => "INTERNAL", false;
        /// UNSEAL: the share is malformed, damaged, of another seed or split, or this
        /// appliance does not unseal with shares.
        ShareInvalid = 60 => "SHARE_INVALID", false;
        /// UNSEAL: this share number was already submitted.
        ShareRepeated = 61 => "SHARE_REPEATED", false;
        /// UNSEAL: the threshold was reached but the shares rebuild another seed (fingerprint
        /// mismatch); every submitted share was discarded.
        SeedMismatch = 62 => "SEED_MISMATCH", false;
        /// UNSEAL: a share was sent to an appliance that is already unsealed.
        AlreadyUnsealed = 63 => "ALREADY_UNSEALED", false;
        /// POLICY_RELOAD: the configuration file does not resolve (the message lists every
        /// problem); the policy in force is unchanged.
        PolicyInvalid = 70 => "POLICY_INVALID", false;
        /// POLICY_RELOAD: the appliance was started without a configuration file to re-read.
        ReloadUnavailable = 71 => "RELOAD_UNAVAILABLE", false;
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

code_table! {
    /// The appliance's seal state, as SEAL, UNSEAL and SEAL_STATUS report it. Codes are on
    /// the wire: never renumber.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    pub enum SealStateCode: u8, from from_u8,
        /// Whether derivations are served in this state.
        serving -> bool {
        Unsealed = 1 => "UNSEALED", true;
        ServingStale = 2 => "SERVING_STALE", true;
        /// Sealed, waiting for shares (`shamir` provider).
        Sealed = 3 => "SEALED", false;
        /// Some shares in, fewer than the threshold.
        Unsealing = 4 => "UNSEALING", false;
        SealedByOperator = 5 => "SEALED_BY_OPERATOR", false;
        SealedByFailure = 6 => "SEALED_BY_FAILURE", false;
    }
}

code_table! {
    /// Which seal provider the appliance runs. Codes are on the wire: never renumber.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum ProviderCode: u8, from from_u8 {
            Dev = 1 => "dev",
            Pkcs11 = 2 => "pkcs11",
            Shamir = 3 => "shamir",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who may send each operation is a security property: pinned here, row by row.
    #[test]
    fn each_opcode_has_its_gate() {
        let pinned = [
            (Opcode::Hello, Gate::Anyone),
            (Opcode::SealStatus, Gate::Anyone),
            (Opcode::Regions, Gate::AnyRole),
            (Opcode::Register, Gate::Operator),
            (Opcode::Rotate, Gate::Operator),
            (Opcode::Suspend, Gate::Operator),
            (Opcode::Resume, Gate::Operator),
            (Opcode::Seal, Gate::Admin),
            (Opcode::Unseal, Gate::Admin),
            (Opcode::Retire, Gate::Admin),
            (Opcode::SetRegion, Gate::Admin),
            (Opcode::PolicyReload, Gate::Admin),
            (Opcode::Status, Gate::Reader),
            (Opcode::Reconcile, Gate::Reader),
            (Opcode::ProveReceipt, Gate::Reader),
            (Opcode::ListAssets, Gate::Reader),
            (Opcode::Derive, Gate::Deriver),
        ];
        assert_eq!(pinned.len(), Opcode::ALL.len());
        for (op, gate) in pinned {
            assert_eq!(op.gate(), gate, "{}", op.name());
        }
    }

    #[test]
    fn framing_errors_and_connection_limits_close_and_nothing_else_does() {
        let closing: Vec<Status> = Status::ALL
            .iter()
            .copied()
            .filter(|s| s.closes_connection())
            .collect();
        assert_eq!(
            closing,
            [
                Status::UnsupportedVersion,
                Status::MalformedFrame,
                Status::FrameTooLarge,
                Status::FrameTimeout,
                Status::ConnectionLimit
            ]
        );
        let serving: Vec<SealStateCode> = SealStateCode::ALL
            .iter()
            .copied()
            .filter(|s| s.serving())
            .collect();
        assert_eq!(
            serving,
            [SealStateCode::Unsealed, SealStateCode::ServingStale]
        );
    }

    #[test]
    fn names_are_screaming_snake_case_and_unique() {
        let mut names: Vec<&str> = Opcode::ALL.iter().map(|o| o.name()).collect();
        names.extend(Status::ALL.iter().map(|s| s.name()));
        for n in &names {
            assert!(n.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{n}");
        }
        let ops: std::collections::HashSet<_> = Opcode::ALL.iter().map(|o| o.name()).collect();
        let statuses: std::collections::HashSet<_> = Status::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(ops.len(), Opcode::ALL.len());
        assert_eq!(statuses.len(), Status::ALL.len());
    }
}
