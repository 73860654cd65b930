//! The access policy (pure code): every request passes it before it reaches a shard. Who
//! holds which role (deriver by purpose, region and asset group; operator; admin;
//! auditor), at which rate, the configured regions, and the asset id rule every operation
//! shares. An operation's own field rules are in its file of [`crate::op`] (DERIVE's:
//! `op/derive.rs`); what each opcode needs is its row's gate in [`crate::wire::Opcode`].

use crate::kdf::DerivationPath;
pub use crate::ratelimit::RateLimit;
use crate::wire::{Gate, Refusal, Status};
use std::sync::Arc;
use uuid::{Uuid, Variant};

/// Why the caller wants the key. The codes are on the wire: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum Purpose {
    Trading = 1,
    Settlement = 2,
    Audit = 3,
    Backup = 4,
}

impl Purpose {
    pub const ALL: [Purpose; 4] = [
        Purpose::Trading,
        Purpose::Settlement,
        Purpose::Audit,
        Purpose::Backup,
    ];

    pub fn from_u8(code: u8) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| *p as u8 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Trading => "TRADING",
            Purpose::Settlement => "SETTLEMENT",
            Purpose::Audit => "AUDIT",
            Purpose::Backup => "BACKUP",
        }
    }

    pub fn from_name(name: &str) -> Option<Purpose> {
        Purpose::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }
}

/// A derive request that passed the field rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedDerive {
    pub asset: Uuid,
    pub path: DerivationPath,
    /// The configured region's name.
    pub region: Arc<str>,
    pub purpose: Purpose,
    pub ttl_s: u32,
}

/// The configured regions, in configuration order, each with its slot in the region
/// switch. Part of the policy, so a reload replaces the list whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionTable {
    names: Vec<Arc<str>>,
    slots: Vec<usize>,
}

impl RegionTable {
    /// The regions in slots `0..names.len()`, as a switch made from the same list holds them.
    pub fn in_order(names: &[String]) -> RegionTable {
        RegionTable {
            names: names.iter().map(|n| Arc::from(n.as_str())).collect(),
            slots: (0..names.len()).collect(),
        }
    }

    /// The regions with the slots a switch gave them ([`crate::regions::RegionSwitch::claim`]).
    pub fn with_slots(names: &[String], slots: Vec<usize>) -> RegionTable {
        debug_assert_eq!(names.len(), slots.len());
        RegionTable {
            names: names.iter().map(|n| Arc::from(n.as_str())).collect(),
            slots,
        }
    }

    /// A configured region's name (shared) and slot.
    pub fn find(&self, name: &str) -> Option<(&Arc<str>, usize)> {
        let i = self.names.iter().position(|n| **n == *name)?;
        Some((self.names.get(i)?, *self.slots.get(i)?))
    }

    pub fn names(&self) -> Vec<String> {
        self.names.iter().map(|n| n.to_string()).collect()
    }

    /// Every configured region and whether it is enabled, in configuration order.
    pub fn states(&self, switch: &crate::regions::RegionSwitch) -> Vec<(String, bool)> {
        self.names
            .iter()
            .zip(&self.slots)
            .map(|(n, &slot)| (n.to_string(), switch.is_enabled(slot)))
            .collect()
    }
}

/// The field rules, reading the appliance's region switch.
#[derive(Clone, Debug)]
pub struct FieldRules {
    switch: Arc<crate::regions::RegionSwitch>,
}

impl FieldRules {
    /// Rules that read the appliance's shared region switch.
    pub fn with_switch(switch: Arc<crate::regions::RegionSwitch>) -> FieldRules {
        FieldRules { switch }
    }

    pub fn switch(&self) -> &Arc<crate::regions::RegionSwitch> {
        &self.switch
    }
}

/// The roles of the policy. An identity may hold several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// DERIVE, within its purposes and regions.
    Deriver,
    /// REGISTER, ROTATE, SUSPEND, RESUME (and STATUS).
    Operator,
    /// RETIRE, SEAL, UNSEAL, and what an operator may.
    Admin,
    /// STATUS (reconciliation and audit reads come with the audit issue).
    Auditor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Deriver, Role::Operator, Role::Admin, Role::Auditor];

    pub fn name(self) -> &'static str {
        match self {
            Role::Deriver => "deriver",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

/// What a deriver may ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeriverGrant {
    pub purposes: Vec<Purpose>,
    pub regions: Vec<String>,
    /// The asset groups it is limited to (`None`: every asset), by name and as a mask of
    /// the policy's [`AssetGroups`].
    pub asset_groups: Option<(Vec<String>, u64)>,
}

/// Named sets of assets that a deriver's grant may be limited to (`policy.asset_groups`).
/// A group's bit is its position; an asset may be in several groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssetGroups {
    names: Vec<String>,
    members: std::collections::HashMap<Uuid, u64>,
}

impl AssetGroups {
    /// At most [`crate::bounds::ASSET_GROUPS_MAX`] groups (the config checks it); the
    /// groups past the bound are dropped.
    pub fn new(groups: Vec<(String, Vec<Uuid>)>) -> AssetGroups {
        let mut out = AssetGroups::default();
        for (bit, (name, assets)) in groups
            .into_iter()
            .take(crate::bounds::ASSET_GROUPS_MAX)
            .enumerate()
        {
            for a in assets {
                *out.members.entry(a).or_default() |= 1u64 << bit;
            }
            out.names.push(name);
        }
        out
    }

    /// The mask of the named groups, or the first name that is not a group.
    pub fn mask<'a>(&self, names: &'a [String]) -> Result<u64, &'a str> {
        names.iter().try_fold(0u64, |mask, n| {
            match self.names.iter().position(|g| g == n) {
                Some(bit) => Ok(mask | 1u64 << bit),
                None => Err(n.as_str()),
            }
        })
    }

    /// The mask of the groups `asset` is in (0: none).
    pub fn of(&self, asset: &Uuid) -> u64 {
        self.members.get(asset).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The roles one identity holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub deriver: Option<DeriverGrant>,
    pub operator: bool,
    pub admin: bool,
    pub auditor: bool,
}

impl Grants {
    fn any(&self) -> bool {
        self.deriver.is_some() || self.operator || self.admin || self.auditor
    }
}

/// What a request needs from the policy.
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// HELLO and SEAL_STATUS: any authenticated client.
    Anyone,
    Derive {
        asset: &'a Uuid,
        purpose: Purpose,
        region: &'a str,
    },
    /// REGISTER, ROTATE, SUSPEND, RESUME.
    Operator,
    /// RETIRE, SEAL, UNSEAL.
    Admin,
    /// STATUS.
    Status,
    /// REGIONS: any identity that holds a role.
    AnyRole,
}

/// What the policy allows a request under: the role that allows it and that role's rate
/// limit. Each (requester, asset, role) has a bucket of its own, so a deriver's use does
/// not spend the same identity's operator budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    pub role: Role,
    pub limit: RateLimit,
}

/// Why the policy refused a request (the label of the denial counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The identity holds no role at all.
    NoRole,
    /// It lacks the role the operation needs.
    Role,
    /// A deriver asked for a purpose it is not granted.
    Purpose,
    /// A deriver asked for a region it is not granted.
    Region,
    /// A deriver limited to asset groups asked for an asset outside them.
    AssetGroup,
}

impl DenyReason {
    pub const ALL: [DenyReason; 5] = [
        DenyReason::NoRole,
        DenyReason::Role,
        DenyReason::Purpose,
        DenyReason::Region,
        DenyReason::AssetGroup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DenyReason::NoRole => "no_role",
            DenyReason::Role => "role",
            DenyReason::Purpose => "purpose",
            DenyReason::Region => "region",
            DenyReason::AssetGroup => "asset_group",
        }
    }
}

/// A refusal by the policy, with its reason for the counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub reason: DenyReason,
    pub refusal: Refusal,
}

/// Identities, their roles, each role's rate limit, the asset groups and the configured
/// regions: everything a reload replaces, as one value. Pure; built from the config.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    grants: std::collections::HashMap<String, Grants>,
    limits: [RateLimit; 4],
    groups: AssetGroups,
    regions: RegionTable,
}

impl AccessPolicy {
    /// `limits`: each role's rate limit, in the order of [`Role::ALL`]. No asset groups
    /// and no regions until [`AccessPolicy::with_asset_groups`] and
    /// [`AccessPolicy::with_regions`].
    pub fn new(
        grants: std::collections::HashMap<String, Grants>,
        limits: [RateLimit; 4],
    ) -> AccessPolicy {
        AccessPolicy {
            grants,
            limits,
            groups: AssetGroups::default(),
            regions: RegionTable::default(),
        }
    }

    /// The asset groups the grants' masks refer to.
    pub fn with_asset_groups(mut self, groups: AssetGroups) -> AccessPolicy {
        self.groups = groups;
        self
    }

    pub fn with_regions(mut self, regions: RegionTable) -> AccessPolicy {
        self.regions = regions;
        self
    }

    pub fn regions(&self) -> &RegionTable {
        &self.regions
    }

    pub fn asset_groups(&self) -> &AssetGroups {
        &self.groups
    }

    /// How many identities hold a role.
    pub fn identities(&self) -> usize {
        self.grants.values().filter(|g| g.any()).count()
    }

    pub fn grants(&self, identity: &str) -> Option<&Grants> {
        self.grants.get(identity)
    }

    fn allowance(&self, role: Role) -> Allowance {
        Allowance {
            role,
            limit: self.limits[role as usize],
        }
    }

    /// The gate of an opcode's table row: whether `identity` may send it at all, with the
    /// rate of the role that allows it. DERIVE's gate asks only for a role here; its
    /// purpose, region and asset group are checked once its fields are
    /// (`op::derive`).
    pub fn pass_gate(&self, identity: &str, gate: Gate) -> Result<Option<Allowance>, Denied> {
        let need = match gate {
            Gate::Anyone => Need::Anyone,
            Gate::AnyRole => Need::AnyRole,
            Gate::Operator => Need::Operator,
            Gate::Admin => Need::Admin,
            Gate::Reader => Need::Status,
            Gate::Deriver => return self.require_a_role(identity).map(|()| None),
        };
        self.authorize(identity, need)
    }

    /// Refuses an identity that holds no role (before its request's fields are looked at).
    pub fn require_a_role(&self, identity: &str) -> Result<(), Denied> {
        self.roles_of(identity).map(|_| ())
    }

    /// The identity's grants, if it holds any role: one lookup.
    fn roles_of(&self, identity: &str) -> Result<&Grants, Denied> {
        match self.grants.get(identity) {
            Some(g) if g.any() => Ok(g),
            _ => Err(Denied {
                reason: DenyReason::NoRole,
                refusal: Refusal::new(
                    Status::Forbidden,
                    format!("identity {identity:?} has no role in the policy (policy.derivers, operators, admins, auditors)"),
                ),
            }),
        }
    }

    /// Whether `identity` may do what `need` says: the rate limit of the role that allows
    /// it (`None` for what anyone may do), or why not.
    pub fn authorize(&self, identity: &str, need: Need<'_>) -> Result<Option<Allowance>, Denied> {
        if let Need::Anyone = need {
            return Ok(None);
        }
        let deny = |reason, message: String| Denied {
            reason,
            refusal: Refusal::new(Status::Forbidden, message),
        };
        let g = self.roles_of(identity)?;
        match need {
            Need::Anyone => Ok(None),
            Need::Derive {
                asset,
                purpose,
                region,
            } => {
                let Some(d) = &g.deriver else {
                    return Err(deny(
                        DenyReason::Role,
                        format!("DERIVE needs the deriver role; {identity:?} is not in policy.derivers"),
                    ));
                };
                if !d.purposes.contains(&purpose) {
                    return Err(deny(
                        DenyReason::Purpose,
                        format!("{identity:?} may not derive for purpose {} (granted: {})", purpose.name(),
                            d.purposes.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")),
                    ));
                }
                if !d.regions.iter().any(|r| r == region) {
                    return Err(deny(
                        DenyReason::Region,
                        format!("{identity:?} may not derive in region {region} (granted: {})", d.regions.join(", ")),
                    ));
                }
                if let Some((names, mask)) = &d.asset_groups {
                    if self.groups.of(asset) & mask == 0 {
                        return Err(deny(
                            DenyReason::AssetGroup,
                            format!("{identity:?} may not derive asset {asset}: it is in none of the asset groups granted ({})", names.join(", ")),
                        ));
                    }
                }
                Ok(Some(self.allowance(Role::Deriver)))
            }
            Need::AnyRole => Ok(None),
            Need::Operator if g.operator => Ok(Some(self.allowance(Role::Operator))),
            Need::Operator | Need::Admin if g.admin => Ok(Some(self.allowance(Role::Admin))),
            Need::Operator => Err(deny(
                DenyReason::Role,
                format!("this operation needs the operator role; {identity:?} is not in policy.operators (or policy.admins)"),
            )),
            Need::Admin => Err(deny(
                DenyReason::Role,
                format!("this operation needs the admin role; {identity:?} is not in policy.admins"),
            )),
            Need::Status => {
                // The most generous limit among the roles that may read status.
                [(g.auditor, Role::Auditor), (g.operator, Role::Operator), (g.admin, Role::Admin)]
                    .into_iter()
                    .filter(|(held, _)| *held)
                    .map(|(_, role)| self.allowance(role))
                    .max_by_key(|a| u128::from(a.limit.requests) * 1_000_000_000 / a.limit.period.as_nanos().max(1))
                    .map(Some)
                    .ok_or_else(|| deny(
                        DenyReason::Role,
                        format!("STATUS needs the auditor, operator or admin role; {identity:?} holds none of them"),
                    ))
            }
        }
    }
}

/// The access policy in force, shared by every core and replaced whole on a reload: a
/// core takes the new one when the generation moved (one atomic load per request).
pub type PolicyCell = crate::published::Published<AccessPolicy>;

/// A core's copy of the policy in force: refreshed when the cell's generation moved.
pub type CorePolicy = crate::published::LocalCopy<AccessPolicy>;

/// An asset id must be an RFC 4122 UUID (variant bits 10, version 1–8), not nil or max.
pub fn check_asset_id(asset: &Uuid) -> Result<(), Refusal> {
    let version_ok = (1..=8).contains(&asset.get_version_num());
    if asset.get_variant() != Variant::RFC4122 || !version_ok {
        return Err(Refusal::new(
            Status::InvalidAssetId,
            format!("asset_id {asset} is not an RFC 4122 UUID (variant 10, version 1-8)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::derive::tests::body;

    #[test]
    fn region_switches_load_set_and_a_disabled_region_is_refused() {
        use crate::regions::RegionSwitch;
        let names: Vec<String> = vec!["US-EAST".into(), "EU-WEST".into()];
        let s = Arc::new(RegionSwitch::new(&names));
        assert!(s.is_enabled(0) && s.is_enabled(1));
        assert_eq!(s.slot("EU-WEST"), Some(1));
        assert_eq!(s.slot("eu-west"), None);
        // A stored switch of a region not configured now is remembered in a slot.
        let lost = s.load(&[("EU-WEST".into(), false), ("MARS".into(), false)]);
        assert!(lost.is_empty());
        assert_eq!(s.slot("MARS"), Some(2));
        assert!(!s.is_enabled(2));
        let table = RegionTable::in_order(&names);
        assert_eq!(
            table.states(&s),
            [
                ("US-EAST".to_string(), true),
                ("EU-WEST".to_string(), false)
            ]
        );
        assert!(!s.is_enabled(7000), "a slot out of range is not enabled");
        let rules = FieldRules::with_switch(s.clone());
        let mut b = body();
        assert_eq!(
            b.check(rules.switch(), &table).unwrap_err().status,
            Status::RegionDisabled
        );
        b.region = "APAC".into();
        assert_eq!(
            b.check(rules.switch(), &table).unwrap_err().status,
            Status::InvalidRegion
        );
        b.region = "MARS".into();
        assert_eq!(
            b.check(rules.switch(), &table).unwrap_err().status,
            Status::InvalidRegion,
            "a remembered but unconfigured region is not configured"
        );
        s.set(1, true);
        b.region = "EU-WEST".into();
        assert!(b.check(rules.switch(), &table).is_ok());
    }

    #[test]
    fn a_reload_claims_slots_whole_and_a_region_comes_back_with_its_switch() {
        use crate::regions::RegionSwitch;
        let s = RegionSwitch::with_slots(&["US-EAST".into(), "EU-WEST".into()], 4);
        s.set(1, false);
        // EU-WEST removed, APAC added: APAC takes a new slot, enabled.
        let next: Vec<String> = vec!["US-EAST".into(), "APAC".into()];
        let slots = s.claim(&next).unwrap();
        assert_eq!(slots, [0, 2]);
        let table = RegionTable::with_slots(&next, slots);
        assert_eq!(
            table.states(&s),
            [("US-EAST".to_string(), true), ("APAC".to_string(), true)]
        );
        assert_eq!(table.find("EU-WEST"), None);
        // Three new regions do not fit the one free slot: nothing is claimed.
        let too_many: Vec<String> = vec!["A".into(), "B".into(), "EU-WEST".into(), "C".into()];
        let err = s.claim(&too_many).unwrap_err();
        assert_eq!(err, crate::regions::SlotsFull { needed: 3, free: 1 });
        assert_eq!(s.slot("A"), None);
        // EU-WEST comes back disabled, as an admin left it.
        let back: Vec<String> = vec!["EU-WEST".into(), "APAC".into()];
        let slots = s.claim(&back).unwrap();
        let table = RegionTable::with_slots(&back, slots);
        assert_eq!(
            table.states(&s),
            [("EU-WEST".to_string(), false), ("APAC".to_string(), true)]
        );
    }

    #[test]
    fn asset_groups_limit_a_deriver_and_are_counted_apart() {
        let fx = Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap();
        let rates = Uuid::parse_str("1b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap();
        let other = Uuid::parse_str("2b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap();
        let groups = AssetGroups::new(vec![
            ("desk-fx".into(), vec![fx]),
            ("desk-rates".into(), vec![rates, fx]),
        ]);
        assert_eq!(groups.of(&fx), 0b11);
        assert_eq!(groups.of(&other), 0);
        assert_eq!(groups.mask(&["desk-rates".into()]), Ok(0b10));
        assert_eq!(groups.mask(&["desk-equities".into()]), Err("desk-equities"));
        let grant = |asset_groups| Grants {
            deriver: Some(DeriverGrant {
                purposes: vec![Purpose::Trading],
                regions: vec!["US-EAST".into()],
                asset_groups,
            }),
            ..Grants::default()
        };
        let limit = RateLimit::parse("100/60s").unwrap();
        let policy = AccessPolicy::new(
            [
                (
                    "rates".to_string(),
                    grant(Some((vec!["desk-rates".into()], 0b10))),
                ),
                ("any".to_string(), grant(None)),
            ]
            .into_iter()
            .collect(),
            [limit; 4],
        )
        .with_asset_groups(groups);
        let need = |asset| Need::Derive {
            asset,
            purpose: Purpose::Trading,
            region: "US-EAST",
        };
        assert!(policy.authorize("rates", need(&rates)).is_ok());
        assert!(
            policy.authorize("rates", need(&fx)).is_ok(),
            "fx is in both groups"
        );
        let denied = policy.authorize("rates", need(&other)).unwrap_err();
        assert_eq!(denied.reason, DenyReason::AssetGroup);
        assert!(
            denied.refusal.message.contains("desk-rates"),
            "{}",
            denied.refusal.message
        );
        assert!(
            policy.authorize("any", need(&other)).is_ok(),
            "no groups: every asset"
        );
        assert_eq!(policy.identities(), 2);
    }

    #[test]
    fn purposes_round_trip() {
        for p in Purpose::ALL {
            assert_eq!(Purpose::from_u8(p as u8), Some(p));
            assert_eq!(Purpose::from_name(p.name()), Some(p));
        }
    }
}
