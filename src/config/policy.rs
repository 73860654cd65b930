//! `[policy]`: the compliance regions, who holds which role (admins, operators, auditors,
//! derivers with their purposes, regions and asset groups), the asset groups, and each
//! role's rate limit (with `[limits]`' default rate and bucket count, read here among
//! them), resolved into the [`crate::policy::AccessPolicy`] the gate checks.

use super::resolver::Resolver;
use super::Policy;
use crate::bounds;
use crate::policy::{AssetGroups, DeriverGrant};
use crate::ratelimit::RateLimit;

/// `[policy]` resolved, and the one `[limits]` key read among its rate limits.
pub(super) struct PolicySection {
    /// The section, if every key of it resolved.
    pub(super) policy: Option<Policy>,
    /// `limits.rate_limit_buckets_per_shard`, for [`super::Limits`].
    pub(super) rate_limit_buckets: Option<i64>,
}

/// The identities of each role but the deriver's, as written.
struct RoleLists {
    admins: Option<Vec<String>>,
    operators: Option<Vec<String>>,
    auditors: Option<Vec<String>>,
}

/// `[policy]`, with `limits.rate_limit` and `limits.rate_limit_buckets_per_shard` (read
/// in this order, the order their problems are listed in).
pub(super) fn resolve_policy(r: &mut Resolver<'_>) -> PolicySection {
    let regions = regions(r);
    let roles = role_lists(r);
    let default_limit = match r.string("limits.rate_limit") {
        Some(text) => match RateLimit::parse(&text) {
            Ok(l) => Some(l),
            Err(e) => r.problem("limits.rate_limit", e),
        },
        None => None,
    };
    let rate_limit_buckets = r.int(
        "limits.rate_limit_buckets_per_shard",
        1,
        bounds::RATE_LIMIT_BUCKETS_PER_SHARD_CAP as i64,
    );
    let role_limits = r.rate_limits("policy.rate_limits", default_limit);
    let groups = r.asset_groups("policy.asset_groups");
    let derivers = r.derivers(
        "policy.derivers",
        regions.as_deref().unwrap_or(&[]),
        groups.as_ref(),
    );
    let policy = match (roles, derivers, role_limits, groups, regions) {
        (
            RoleLists {
                admins: Some(admins),
                operators: Some(operators),
                auditors: Some(auditors),
            },
            Some(derivers),
            Some(limits),
            Some(groups),
            Some(regions),
        ) => {
            let roles = [admins, operators, auditors];
            let access = access_policy(roles, derivers, limits, groups, &regions);
            Some(Policy { regions, access })
        }
        _ => None,
    };
    PolicySection {
        policy,
        rate_limit_buckets,
    }
}

/// `policy.regions`: 1 to [`bounds::REGIONS_MAX`] names of printable ASCII, none twice.
fn regions(r: &mut Resolver<'_>) -> Option<Vec<String>> {
    let regions = r.string_list("policy.regions");
    if let Some(list) = &regions {
        if list.is_empty() || list.len() > bounds::REGIONS_MAX {
            r.problem::<()>(
                "policy.regions",
                format!("must name between 1 and {} regions", bounds::REGIONS_MAX),
            );
        }
        for (i, name) in list.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= bounds::REGION_TEXT_BYTES_MAX
                && name.bytes().all(|b| (0x21..=0x7e).contains(&b));
            if !ok {
                r.problem::<()>(
                    "policy.regions",
                    format!(
                        "{name:?}: a region is 1-{} printable ASCII characters without spaces",
                        bounds::REGION_TEXT_BYTES_MAX
                    ),
                );
            }
            if list[..i].contains(name) {
                r.problem::<()>("policy.regions", format!("{name:?} is listed twice"));
            }
        }
    }
    regions
}

/// `policy.admins`, `operators` and `auditors`: identities, none empty, none twice in a
/// list.
fn role_lists(r: &mut Resolver<'_>) -> RoleLists {
    let admins = r.string_list("policy.admins");
    let operators = r.string_list("policy.operators");
    let auditors = r.string_list("policy.auditors");
    for (key, names) in [
        ("policy.admins", &admins),
        ("policy.operators", &operators),
        ("policy.auditors", &auditors),
    ] {
        if let Some(list) = names {
            for (i, name) in list.iter().enumerate() {
                if name.is_empty() || list[..i].contains(name) {
                    r.problem::<()>(key, format!("{name:?}: empty or listed twice"));
                }
            }
        }
    }
    RoleLists {
        admins,
        operators,
        auditors,
    }
}

/// Every identity's grants, gathered from the role lists (`[admins, operators,
/// auditors]`) and the derivers, with each role's limit, the groups and the regions.
fn access_policy(
    [admins, operators, auditors]: [Vec<String>; 3],
    derivers: Vec<(String, DeriverGrant)>,
    limits: [RateLimit; 4],
    groups: AssetGroups,
    regions: &[String],
) -> crate::policy::AccessPolicy {
    let mut grants: std::collections::HashMap<String, crate::policy::Grants> =
        std::collections::HashMap::new();
    for (identity, d) in derivers {
        grants.entry(identity).or_default().deriver = Some(d);
    }
    for a in admins {
        grants.entry(a).or_default().admin = true;
    }
    for o in operators {
        grants.entry(o).or_default().operator = true;
    }
    for a in auditors {
        grants.entry(a).or_default().auditor = true;
    }
    crate::policy::AccessPolicy::new(grants, limits)
        .with_asset_groups(groups)
        .with_regions(crate::policy::RegionTable::in_order(regions))
}

/// The strings of the list at `field`, if it is a list of strings.
fn strings(t: &toml::Table, field: &str) -> Option<Vec<String>> {
    t.get(field)?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

impl Resolver<'_> {
    /// `policy.rate_limits`: a table of role name → "<requests>/<seconds>s"; every role
    /// not named gets `default` (in the order of [`crate::policy::Role::ALL`]).
    fn rate_limits(
        &mut self,
        key: &'static str,
        default: Option<crate::ratelimit::RateLimit>,
    ) -> Option<[crate::ratelimit::RateLimit; 4]> {
        use crate::policy::Role;
        let default = default?;
        let mut out = [default; 4];
        let table = match self.value(key)? {
            toml::Value::Table(t) => t,
            v => {
                return self.problem(
                    key,
                    format!(
                        "expected a table of role = \"N/Ss\", found {}",
                        v.type_str()
                    ),
                )
            }
        };
        let mut ok = true;
        for (role, value) in table {
            let Some(r) = Role::ALL.into_iter().find(|r| r.name() == role) else {
                self.problem::<()>(
                    key,
                    format!("{role:?} is not a role (deriver, operator, admin, auditor)"),
                );
                ok = false;
                continue;
            };
            match value.as_str().map(crate::ratelimit::RateLimit::parse) {
                Some(Ok(l)) => out[r as usize] = l,
                Some(Err(e)) => {
                    self.problem::<()>(key, format!("{role}: {e}"));
                    ok = false;
                }
                None => {
                    self.problem::<()>(key, format!("{role}: expected a string like \"100/60s\""));
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `policy.asset_groups`: a table of group name → list of asset ids (RFC 4122 UUIDs),
    /// within [`bounds::ASSET_GROUPS_MAX`] groups and [`bounds::ASSET_GROUP_MEMBERS_MAX`]
    /// memberships.
    fn asset_groups(&mut self, key: &'static str) -> Option<crate::policy::AssetGroups> {
        let table = match self.value(key)? {
            toml::Value::Table(t) => t,
            v => {
                return self.problem(
                    key,
                    format!(
                        "expected a table of group = [asset ids], found {}",
                        v.type_str()
                    ),
                )
            }
        };
        if table.len() > bounds::ASSET_GROUPS_MAX {
            return self.problem(
                key,
                format!(
                    "{} groups: at most {} may be defined",
                    table.len(),
                    bounds::ASSET_GROUPS_MAX
                ),
            );
        }
        let members: usize = table
            .values()
            .map(|v| v.as_array().map_or(0, |a| a.len()))
            .sum();
        if members > bounds::ASSET_GROUP_MEMBERS_MAX {
            return self.problem(
                key,
                format!(
                    "{members} memberships: at most {} may be listed",
                    bounds::ASSET_GROUP_MEMBERS_MAX
                ),
            );
        }
        let mut ok = true;
        let mut groups = Vec::with_capacity(table.len());
        for (name, value) in table {
            let at = format!("{key}.{name}");
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                self.problem::<()>(
                    &at,
                    "a group name is 1-64 characters of A-Z, a-z, 0-9, '-', '_' and '.'".into(),
                );
                ok = false;
            }
            let Some(items) = value.as_array() else {
                self.problem::<()>(
                    &at,
                    format!("expected a list of asset ids, found {}", value.type_str()),
                );
                ok = false;
                continue;
            };
            let mut assets = Vec::with_capacity(items.len());
            for item in items {
                let parsed = item
                    .as_str()
                    .and_then(|t| uuid::Uuid::parse_str(t).ok())
                    .filter(|u| crate::policy::check_asset_id(u).is_ok());
                match parsed {
                    Some(u) => assets.push(u),
                    None => {
                        self.problem::<()>(
                            &at,
                            format!("{item}: not an RFC 4122 asset id (a UUID, variant 10, version 1-8)"),
                        );
                        ok = false;
                    }
                }
            }
            groups.push((name, assets));
        }
        ok.then(|| crate::policy::AssetGroups::new(groups))
    }

    /// `policy.derivers`: a list of `{ identity, purposes, regions, asset_groups? }`;
    /// every purpose a known one, every region a configured one, every group a defined
    /// one, no identity twice.
    fn derivers(
        &mut self,
        key: &'static str,
        configured: &[String],
        groups: Option<&AssetGroups>,
    ) -> Option<Vec<(String, DeriverGrant)>> {
        let items = match self.value(key)? {
            toml::Value::Array(items) => items,
            v => {
                return self.problem(
                    key,
                    format!("expected a list of tables, found {}", v.type_str()),
                )
            }
        };
        let mut out: Vec<(String, DeriverGrant)> = Vec::new();
        let mut ok = true;
        for (i, item) in items.into_iter().enumerate() {
            let mut entry = Entry {
                r: self,
                at: format!("{key}[{i}]"),
                ok: true,
            };
            let Some(t) = item.as_table() else {
                entry.fail("expected a table { identity, purposes, regions }".into());
                ok = false;
                continue;
            };
            entry.no_unknown_fields(t);
            let identity = entry.identity(t, &out);
            let purposes = entry.purposes(t);
            let regions = entry.regions(t, configured);
            let asset_groups = entry.asset_groups(t, groups);
            ok &= entry.ok;
            out.push((
                identity,
                DeriverGrant {
                    purposes,
                    regions,
                    asset_groups,
                },
            ));
        }
        ok.then_some(out)
    }
}

/// One entry of `policy.derivers` being read: where it is (`policy.derivers[i]`, the key
/// of its problems) and whether it has any. Every field is checked, so that all of an
/// entry's problems are listed at once.
struct Entry<'r, 'a> {
    r: &'r mut Resolver<'a>,
    at: String,
    ok: bool,
}

impl Entry<'_, '_> {
    fn fail(&mut self, message: String) {
        self.r.problem::<()>(&self.at, message);
        self.ok = false;
    }

    fn no_unknown_fields(&mut self, t: &toml::Table) {
        if let Some(extra) = t
            .keys()
            .find(|k| !["identity", "purposes", "regions", "asset_groups"].contains(&k.as_str()))
        {
            self.fail(format!(
                "unknown field {extra:?} (identity, purposes, regions, asset_groups)"
            ));
        }
    }

    /// `identity`: present, not empty, and not one of the entries before (`taken`).
    fn identity(&mut self, t: &toml::Table, taken: &[(String, DeriverGrant)]) -> String {
        let identity = t
            .get("identity")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        if identity.is_empty() || taken.iter().any(|(id, _)| *id == identity) {
            self.fail(format!(
                "identity {identity:?}: missing, empty or listed twice"
            ));
        }
        identity
    }

    /// `purposes`: a non-empty list of known purposes (one named twice counts once).
    fn purposes(&mut self, t: &toml::Table) -> Vec<crate::policy::Purpose> {
        let mut purposes = Vec::new();
        match strings(t, "purposes") {
            Some(list) if !list.is_empty() => {
                for name in list {
                    match crate::policy::Purpose::from_name(&name) {
                        Some(p) if !purposes.contains(&p) => purposes.push(p),
                        Some(_) => {}
                        None => self.fail(format!(
                            "purpose {name:?} is not TRADING, SETTLEMENT, AUDIT or BACKUP"
                        )),
                    }
                }
            }
            _ => self.fail("purposes: a non-empty list of purpose names is required".into()),
        }
        purposes
    }

    /// `regions`: a non-empty list of regions of `policy.regions` (`configured`).
    fn regions(&mut self, t: &toml::Table, configured: &[String]) -> Vec<String> {
        match strings(t, "regions") {
            Some(list) if !list.is_empty() => {
                for name in &list {
                    if !configured.contains(name) {
                        self.fail(format!("region {name:?} is not in policy.regions"));
                    }
                }
                list
            }
            _ => {
                self.fail("regions: a non-empty list of configured regions is required".into());
                Vec::new()
            }
        }
    }

    /// `asset_groups`, if given: a non-empty list of groups of `policy.asset_groups`, with
    /// their mask.
    fn asset_groups(
        &mut self,
        t: &toml::Table,
        groups: Option<&AssetGroups>,
    ) -> Option<(Vec<String>, u64)> {
        t.get("asset_groups")?;
        match (strings(t, "asset_groups"), groups) {
            (Some(names), Some(groups)) if !names.is_empty() => match groups.mask(&names) {
                Ok(mask) => Some((names, mask)),
                Err(unknown) => {
                    self.fail(format!(
                        "asset group {unknown:?} is not in policy.asset_groups"
                    ));
                    None
                }
            },
            // The groups themselves are wrong (reported there): still name a group
            // that is not even defined, so every problem is listed at once.
            (Some(names), None) if !names.is_empty() => {
                let defined: Vec<String> = match self.r.raw("policy.asset_groups") {
                    Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
                    _ => Vec::new(),
                };
                for unknown in names.iter().filter(|n| !defined.contains(n)) {
                    self.r.problem::<()>(
                        &self.at,
                        format!("asset group {unknown:?} is not in policy.asset_groups"),
                    );
                }
                self.ok = false;
                None
            }
            _ => {
                self.fail(
                    "asset_groups: a non-empty list of group names (leave it out for every asset)"
                        .into(),
                );
                None
            }
        }
    }
}
