//! Pool selection: which Pool a BatchSandbox with `poolRef: "*"` takes its pods from. The default
//! pool-selection policy is [`least_allocated_fit`] behind a WIT adapter.
//!
//! The default keeps the pools that could serve the batch, as OpenSandbox's default scheduling
//! profile does:
//! - capacity: `poolMax - allocated >= replicas`;
//! - image: when the batch names images, the pool's containers run at least one of them;
//! - resources: for every resource the batch's containers request (summed over containers), the
//!   pool's containers request at least as much; a resource the pool does not request is no fit;
//! - node selector: every key/value of the batch's node selector is among the pool's labels
//!   merged with its template's node selector.
//!
//! Of those it takes the least allocated (`allocated / total`, an empty pool counting as fully
//! allocated), ties going to the first name in byte order.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt::{self, Write};

use crate::quantity::Quantity;
use crate::sizing::Bounds;

/// Longest `reason` a selection may give; it ends up in a condition and events.
pub const MAX_REASON_BYTES: usize = 1024;

/// A `key: value` pair (a label or a node-selector entry).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Label {
    pub key: String,
    pub value: String,
}

/// One entry of a container's `resources.requests`: the resource name and the quantity as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ResourceRequest {
    pub name: String,
    pub quantity: String,
}

/// What one container of a pod template asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ContainerRequirements {
    pub image: String,
    pub requests: Vec<ResourceRequest>,
}

/// What a pod template asks of a pod: its containers and its node selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct PodRequirements {
    pub containers: Vec<ContainerRequirements>,
    pub node_selector: Vec<Label>,
}

/// The batch a pool is sought for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct BatchRequirements {
    pub batch_name: String,
    pub replicas: u32,
    pub template: PodRequirements,
}

/// One Pool of the batch's namespace, as a candidate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct CandidatePool {
    pub pool_name: String,
    /// The Pool object's labels.
    pub labels: Vec<Label>,
    pub template: PodRequirements,
    pub bounds: Bounds,
    /// Pods that exist and are not terminating, allocated or idle.
    pub total: u32,
    /// Pods allocated to BatchSandboxes.
    pub allocated: u32,
    /// Idle pods that are Running and Ready.
    pub idle: u32,
}

/// What a selection decision sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct SelectionInput {
    pub batch: BatchRequirements,
    /// The Pools of the batch's namespace that are not being deleted, by name.
    pub pools: Vec<CandidatePool>,
}

/// The pool chosen, or none; `reason` says why either way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SelectionDecision {
    /// The chosen pool's name, one of the candidates; `None`: no pool fits now.
    pub pool: Option<String>,
    /// Shown in the batch's condition and events. At most [`MAX_REASON_BYTES`].
    pub reason: String,
}

/// What the batch asks of a pool, worked out once for all the candidates.
struct Wanted<'a> {
    replicas: u32,
    /// The images the batch names, sorted and deduplicated.
    images: Vec<&'a str>,
    /// Requests summed over containers, by name; `Err` names an unreadable quantity.
    requests: Result<Vec<(&'a str, Quantity)>, String>,
    node_selector: &'a [Label],
}

impl<'a> Wanted<'a> {
    fn of(batch: &'a BatchRequirements) -> Self {
        Self {
            replicas: batch.replicas,
            images: images(&batch.template),
            requests: total_requests(&batch.template).map(|mut totals| {
                // The order the reason names short resources in.
                totals.sort_unstable_by(|a, b| a.0.cmp(b.0));
                totals
            }),
            node_selector: &batch.template.node_selector,
        }
    }
}

/// One requirement a pool fails. Kept as data so that only the pools the reason has room for
/// are put into words.
enum Misfit<'a> {
    Capacity {
        pool_max: u32,
        allocated: u32,
        wants: u32,
    },
    Images {
        offered: &'a PodRequirements,
        wanted: &'a [&'a str],
    },
    BatchRequest(&'a str),
    PoolRequest(String),
    /// Resources the pool requests less of (`None`: not at all), with what the batch wants.
    Requests(Vec<(&'a str, Option<Quantity>, Quantity)>),
    /// Node-selector keys the pool does not match, in the order the reason names them, each once.
    NodeSelector(Vec<WrongNodeLabel<'a>>),
}

impl fmt::Display for Misfit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misfit::Capacity {
                pool_max,
                allocated,
                wants,
            } => write!(
                f,
                "at capacity (poolMax {pool_max}, allocated {allocated}, wants {wants})"
            ),
            Misfit::Images { offered, wanted } => {
                f.write_str("images [")?;
                write_joined(f, &images(offered))?;
                f.write_str("] not [")?;
                write_joined(f, wanted)?;
                f.write_str("]")
            }
            Misfit::BatchRequest(bad) => write!(f, "batch request {bad}"),
            Misfit::PoolRequest(bad) => write!(f, "pool request {bad}"),
            Misfit::Requests(short) => {
                f.write_str("requests ")?;
                for (i, (name, has, want)) in short.iter().enumerate() {
                    f.write_str(if i == 0 { "" } else { ", " })?;
                    f.write_str(name)?;
                    f.write_str(" ")?;
                    match has {
                        Some(has) => fmt::Display::fmt(has, f)?,
                        None => f.write_str("none")?,
                    }
                    f.write_str(" < ")?;
                    fmt::Display::fmt(want, f)?;
                }
                Ok(())
            }
            Misfit::NodeSelector(wrong) => {
                f.write_str("nodeSelector ")?;
                for (i, entry) in wrong.iter().enumerate() {
                    f.write_str(if i == 0 { "" } else { ", " })?;
                    for part in entry.words() {
                        f.write_str(part)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// `items` separated by commas.
fn write_joined(f: &mut fmt::Formatter<'_>, items: &[&str]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        f.write_str(if i == 0 { "" } else { ", " })?;
        f.write_str(item)?;
    }
    Ok(())
}

/// A node-selector key a pool does not match: the key, the pool's value, the wanted value.
struct WrongNodeLabel<'a> {
    key: &'a str,
    has: Option<&'a str>,
    want: &'a str,
}

impl<'a> WrongNodeLabel<'a> {
    /// How the reason puts it: `key=has not want`, or `key unset`.
    fn words(&self) -> [&'a str; 5] {
        match self.has {
            Some(has) => [self.key, "=", has, " not ", self.want],
            None => [self.key, " unset", "", "", ""],
        }
    }

    /// Orders entries as their words read, byte by byte, without writing them out.
    fn cmp_words(&self, other: &Self) -> Ordering {
        let bytes = |entry: &Self| entry.words().into_iter().flat_map(str::bytes);
        bytes(self).cmp(bytes(other))
    }
}

/// Why a pool cannot serve the batch, one entry per failed requirement.
fn misfits<'a>(wanted: &'a Wanted<'a>, pool: &'a CandidatePool) -> Vec<Misfit<'a>> {
    let mut why = Vec::new();
    let room = i64::from(pool.bounds.pool_max) - i64::from(pool.allocated);
    if room < i64::from(wanted.replicas) {
        why.push(Misfit::Capacity {
            pool_max: pool.bounds.pool_max,
            allocated: pool.allocated,
            wants: wanted.replicas,
        });
    }
    if image_mismatch(&wanted.images, &pool.template) {
        why.push(Misfit::Images {
            offered: &pool.template,
            wanted: &wanted.images,
        });
    }
    if let Some(resources) = resource_shortfall(&wanted.requests, &pool.template) {
        why.push(resources);
    }
    if let Some(selector) = node_selector_mismatch(wanted.node_selector, pool) {
        why.push(selector);
    }
    why
}

fn images(template: &PodRequirements) -> Vec<&str> {
    let mut images: Vec<&str> = template
        .containers
        .iter()
        .map(|c| c.image.as_str())
        .filter(|i| !i.is_empty())
        .collect();
    images.sort_unstable();
    images.dedup();
    images
}

/// The pool must run at least one image the batch names (none named: any pool).
fn image_mismatch(wanted: &[&str], pool: &PodRequirements) -> bool {
    !wanted.is_empty()
        && !pool
            .containers
            .iter()
            .any(|c| !c.image.is_empty() && wanted.binary_search(&c.image.as_str()).is_ok())
}

/// Requests summed over containers, one entry per resource name in the order first requested;
/// `Err` names an unreadable quantity.
fn total_requests(template: &PodRequirements) -> Result<Vec<(&str, Quantity)>, String> {
    let requests = template.containers.iter().map(|c| c.requests.len()).sum();
    let mut totals: Vec<(&str, Quantity)> = Vec::with_capacity(requests);
    for request in template.containers.iter().flat_map(|c| &c.requests) {
        let quantity = Quantity::parse(&request.quantity)
            .map_err(|e| format!("{} {:?} {e}", request.name, request.quantity))?;
        match totals.iter_mut().find(|(name, _)| *name == request.name) {
            Some((_, sum)) => {
                *sum = sum
                    .checked_add(quantity)
                    .ok_or_else(|| format!("{} requests overflow", request.name))?;
            }
            None => totals.push((&request.name, quantity)),
        }
    }
    Ok(totals)
}

/// The pool's pods must request at least what the batch's pods request, resource by resource.
fn resource_shortfall<'a>(
    wanted: &'a Result<Vec<(&'a str, Quantity)>, String>,
    pool: &'a PodRequirements,
) -> Option<Misfit<'a>> {
    let wanted = match wanted {
        Ok(wanted) => wanted,
        Err(bad) => return Some(Misfit::BatchRequest(bad)),
    };
    if wanted.is_empty() {
        return None;
    }
    let offered = match total_requests(pool) {
        Ok(offered) => offered,
        Err(bad) => return Some(Misfit::PoolRequest(bad)),
    };
    let short: Vec<(&str, Option<Quantity>, Quantity)> = wanted
        .iter()
        .filter_map(
            |(name, want)| match offered.iter().find(|(n, _)| n == name).map(|(_, q)| *q) {
                Some(has) if has >= *want => None,
                has => Some((*name, has, *want)),
            },
        )
        .collect();
    (!short.is_empty()).then_some(Misfit::Requests(short))
}

/// Every node-selector entry of the batch must be among the pool's labels merged with its
/// template's node selector (the template's entries win).
fn node_selector_mismatch<'a>(wanted: &'a [Label], pool: &'a CandidatePool) -> Option<Misfit<'a>> {
    let pool_value = |key: &str| {
        pool.template
            .node_selector
            .iter()
            .rev()
            .chain(pool.labels.iter().rev())
            .find(|l| l.key == key)
            .map(|l| l.value.as_str())
    };
    let mut wrong: Vec<WrongNodeLabel<'a>> = wanted
        .iter()
        .filter_map(|want| match pool_value(&want.key) {
            Some(v) if v == want.value => None,
            has => Some(WrongNodeLabel {
                key: &want.key,
                has,
                want: &want.value,
            }),
        })
        .collect();
    wrong.sort_unstable_by(WrongNodeLabel::cmp_words);
    wrong.dedup_by(|a, b| a.cmp_words(b) == Ordering::Equal);
    (!wrong.is_empty()).then_some(Misfit::NodeSelector(wrong))
}

/// Compares how free two pools are: `Greater` when `a` is less allocated than `b`.
/// Freedom is `1 - allocated/total` (0 for an empty pool), compared exactly.
fn freedom(a: &CandidatePool, b: &CandidatePool) -> Ordering {
    let fraction = |p: &CandidatePool| -> (i128, i128) {
        if p.total == 0 {
            (0, 1)
        } else {
            (
                i128::from(p.total) - i128::from(p.allocated),
                i128::from(p.total),
            )
        }
    };
    let (an, ad) = fraction(a);
    let (bn, bd) = fraction(b);
    (an * bd).cmp(&(bn * ad))
}

/// The default decision: the least allocated pool that fits, ties to the first name.
pub fn least_allocated_fit(input: &SelectionInput) -> SelectionDecision {
    let wanted = Wanted::of(&input.batch);
    let mut fitting: Vec<&CandidatePool> = Vec::new();
    let mut rejected: Vec<(&str, Vec<Misfit<'_>>)> = Vec::new();
    for pool in &input.pools {
        let why = misfits(&wanted, pool);
        if why.is_empty() {
            fitting.push(pool);
        } else {
            rejected.push((&pool.pool_name, why));
        }
    }
    rejected.sort_by(|a, b| a.0.cmp(b.0));
    let best = fitting.iter().copied().reduce(|best, pool| {
        match freedom(pool, best).then_with(|| best.pool_name.cmp(&pool.pool_name)) {
            Ordering::Greater => pool,
            _ => best,
        }
    });
    // Room for the longest reason kept and then some, so that writing it seldom moves it.
    let mut reason = String::with_capacity(MAX_REASON_BYTES + 256);
    match best {
        Some(pool) => {
            let _ = write!(
                reason,
                "least allocated of {} fitting pool(s) ({}/{} allocated)",
                fitting.len(),
                pool.allocated,
                pool.total
            );
        }
        None if input.pools.is_empty() => reason.push_str("no Pool in the namespace"),
        None => {
            let _ = write!(reason, "0/{} pools fit", input.pools.len());
        }
    }
    if !rejected.is_empty() {
        reason.push_str(if best.is_some() { "; rejected " } else { ": " });
        // Pools past what the reason has room for would only be cut off again.
        for (i, (name, why)) in rejected.iter().enumerate() {
            if reason.len() > MAX_REASON_BYTES {
                break;
            }
            reason.push_str(if i == 0 { "" } else { "; " });
            reason.push_str(name);
            reason.push_str(": ");
            for (j, misfit) in why.iter().enumerate() {
                reason.push_str(if j == 0 { "" } else { "; " });
                let _ = write!(reason, "{misfit}");
            }
        }
    }
    SelectionDecision {
        pool: best.map(|p| p.pool_name.clone()),
        reason: truncate(reason, MAX_REASON_BYTES),
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked with an ellipsis.
pub fn truncate(mut text: String, max: usize) -> String {
    const MORE: &str = "…";
    if text.len() <= max {
        return text;
    }
    let mut end = max - MORE.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MORE);
    text
}

/// Whether the default would let `pool` serve `batch` (for tests and tools).
pub fn fits(batch: &BatchRequirements, pool: &CandidatePool) -> bool {
    misfits(&Wanted::of(batch), pool).is_empty()
}

impl Label {
    pub fn new(key: impl ToString, value: impl ToString) -> Self {
        Self {
            key: key.to_string(),
            value: value.to_string(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn container(image: &str, requests: &[(&str, &str)]) -> ContainerRequirements {
        ContainerRequirements {
            image: image.into(),
            requests: requests
                .iter()
                .map(|(n, q)| ResourceRequest {
                    name: (*n).into(),
                    quantity: (*q).into(),
                })
                .collect(),
        }
    }

    fn batch(image: &str, requests: &[(&str, &str)]) -> BatchRequirements {
        BatchRequirements {
            batch_name: "b".into(),
            replicas: 1,
            template: PodRequirements {
                containers: vec![container(image, requests)],
                node_selector: vec![],
            },
        }
    }

    fn pool(
        name: &str,
        image: &str,
        requests: &[(&str, &str)],
        total: u32,
        allocated: u32,
    ) -> CandidatePool {
        CandidatePool {
            pool_name: name.into(),
            template: PodRequirements {
                containers: vec![container(image, requests)],
                node_selector: vec![],
            },
            bounds: Bounds {
                buffer_min: 0,
                buffer_max: 10,
                pool_min: 0,
                pool_max: 100,
            },
            total,
            allocated,
            idle: total - allocated,
            ..Default::default()
        }
    }

    fn select(batch: BatchRequirements, pools: Vec<CandidatePool>) -> SelectionDecision {
        least_allocated_fit(&SelectionInput { batch, pools })
    }

    #[test]
    fn picks_the_only_pool_that_fits_and_says_why_the_others_do_not() {
        let b = batch("python:3.12", &[("cpu", "500m"), ("memory", "1Gi")]);
        let d = select(
            b,
            vec![
                pool(
                    "other-image",
                    "node:22",
                    &[("cpu", "1"), ("memory", "2Gi")],
                    4,
                    0,
                ),
                pool(
                    "too-small",
                    "python:3.12",
                    &[("cpu", "250m"), ("memory", "1Gi")],
                    4,
                    0,
                ),
                pool(
                    "fits",
                    "python:3.12",
                    &[("cpu", "0.5"), ("memory", "1073741824")],
                    4,
                    3,
                ),
            ],
        );
        assert_eq!(d.pool.as_deref(), Some("fits"));
        assert!(
            d.reason
                .contains("other-image: images [node:22] not [python:3.12]"),
            "{}",
            d.reason
        );
        assert!(
            d.reason.contains("too-small: requests cpu 250m < 500m"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn no_fit_names_every_pool_and_its_reasons() {
        let d = select(
            batch("python:3.12", &[("cpu", "2")]),
            vec![
                pool("b", "python:3.12", &[("cpu", "1")], 1, 0),
                pool("a", "node:22", &[], 1, 0),
            ],
        );
        assert_eq!(d.pool, None);
        assert_eq!(
            d.reason,
            "0/2 pools fit: a: images [node:22] not [python:3.12]; requests cpu none < 2; b: requests cpu 1 < 2"
        );
        assert_eq!(
            select(batch("x", &[]), vec![]).reason,
            "no Pool in the namespace"
        );
    }

    #[test]
    fn least_allocated_wins_and_ties_go_to_the_first_name() {
        let b = batch("img", &[]);
        let d = select(
            b.clone(),
            vec![
                pool("c", "img", &[], 10, 5),
                pool("b", "img", &[], 10, 2),
                pool("a", "img", &[], 10, 8),
            ],
        );
        assert_eq!(d.pool.as_deref(), Some("b"));
        // 2/10 and 1/5 are the same ratio: the name decides.
        let d = select(
            b.clone(),
            vec![pool("z", "img", &[], 10, 2), pool("y", "img", &[], 5, 1)],
        );
        assert_eq!(d.pool.as_deref(), Some("y"));
        // An empty pool counts as fully allocated, as OpenSandbox scores it.
        let d = select(
            b,
            vec![
                pool("empty", "img", &[], 0, 0),
                pool("busy", "img", &[], 10, 9),
            ],
        );
        assert_eq!(d.pool.as_deref(), Some("busy"));
    }

    #[test]
    fn a_resource_the_pool_does_not_request_is_no_fit() {
        let b = batch("img", &[("nvidia.com/gpu", "1")]);
        assert!(!fits(&b, &pool("p", "img", &[("cpu", "8")], 1, 0)));
        assert!(fits(
            &b,
            &pool("p", "img", &[("nvidia.com/gpu", "1")], 1, 0)
        ));
    }

    #[test]
    fn requests_add_up_over_containers() {
        let mut b = batch("img", &[("cpu", "300m")]);
        b.template
            .containers
            .push(container("sidecar", &[("cpu", "300m")]));
        assert!(!fits(&b, &pool("p", "img", &[("cpu", "500m")], 1, 0)));
        let mut p = pool("p", "img", &[("cpu", "300m")], 1, 0);
        p.template
            .containers
            .push(container("other", &[("cpu", "0.3")]));
        assert!(fits(&b, &p));
    }

    #[test]
    fn decimal_and_binary_units_compare_exactly() {
        let b = batch("img", &[("memory", "1G")]);
        assert!(fits(&b, &pool("p", "img", &[("memory", "1Gi")], 1, 0)));
        assert!(fits(&b, &pool("p", "img", &[("memory", "1000M")], 1, 0)));
        assert!(!fits(&b, &pool("p", "img", &[("memory", "953Mi")], 1, 0)));
    }

    #[test]
    fn an_unreadable_quantity_is_no_fit_with_a_reason() {
        let b = batch("img", &[("cpu", "1")]);
        let d = select(b, vec![pool("p", "img", &[("cpu", "lots")], 1, 0)]);
        assert_eq!(d.pool, None);
        assert!(
            d.reason
                .contains("pool request cpu \"lots\" not a Kubernetes quantity"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn node_selector_must_match_pool_labels_or_template_selector() {
        let mut b = batch("img", &[]);
        b.template.node_selector = vec![Label::new("zone", "a")];
        let mut p = pool("p", "img", &[], 1, 0);
        assert!(!fits(&b, &p));
        p.labels = vec![Label::new("zone", "a")];
        assert!(fits(&b, &p));
        // The template's node selector overrides the pool's labels.
        p.template.node_selector = vec![Label::new("zone", "b")];
        let d = select(b, vec![p]);
        assert!(
            d.reason.ends_with("p: nodeSelector zone=b not a"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_misfit_names_every_image_and_wrong_node_label_in_order_once() {
        let mut b = batch("img-b", &[]);
        b.template.containers.push(container("img-a", &[]));
        b.template.node_selector = vec![
            Label::new("a", "x"),
            Label::new("a-b", "y"),
            Label::new("zone", "1"),
            Label::new("a", "x"),
        ];
        let mut p = pool("p", "other-2", &[], 1, 0);
        p.template
            .containers
            .extend([container("other-1", &[]), container("other-2", &[])]);
        p.labels = vec![Label::new("a", "z"), Label::new("a-b", "w")];
        let d = select(b, vec![p]);
        // As the words read: "a-b=" before "a=", each wrong label once.
        assert_eq!(
            d.reason,
            "0/1 pools fit: p: images [other-1, other-2] not [img-a, img-b]; \
             nodeSelector a-b=w not y, a=z not x, zone unset"
        );
    }

    #[test]
    fn capacity_counts_replicas_against_pool_max() {
        let mut b = batch("img", &[]);
        b.replicas = 3;
        let mut p = pool("p", "img", &[], 10, 8);
        p.bounds.pool_max = 10;
        assert!(!fits(&b, &p));
        p.allocated = 7;
        assert!(fits(&b, &p));
    }

    #[test]
    fn a_batch_without_images_or_requests_fits_any_pool_with_room() {
        let b = BatchRequirements {
            replicas: 1,
            ..Default::default()
        };
        assert!(fits(&b, &pool("p", "img", &[("cpu", "1")], 1, 0)));
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let pools = (0..200)
            .map(|i| pool(&format!("pool-é-{i:03}"), "other", &[], 1, 0))
            .collect();
        let d = select(batch("img", &[]), pools);
        assert!(d.reason.len() <= MAX_REASON_BYTES);
        assert!(d.reason.ends_with('…'));
    }

    fn arb_pool() -> impl Strategy<Value = CandidatePool> {
        (
            "[a-e]{1,3}",
            prop::sample::select(vec!["img-a", "img-b", ""]),
            prop::option::of(prop::sample::select(vec!["100m", "500m", "1", "2"])),
            prop::option::of(prop::sample::select(vec!["512Mi", "1Gi", "1G", "2Gi"])),
            0u32..20,
            0u32..20,
            0u32..25,
            prop::option::of(prop::sample::select(vec!["a", "b"])),
        )
            .prop_map(
                |(name, image, cpu, mem, total, allocated, pool_max, zone)| {
                    let mut requests = vec![];
                    if let Some(cpu) = cpu {
                        requests.push(("cpu", cpu));
                    }
                    if let Some(mem) = mem {
                        requests.push(("memory", mem));
                    }
                    let mut p = pool(&name, image, &requests, total, 0);
                    p.allocated = allocated;
                    p.idle = total.saturating_sub(allocated);
                    p.bounds.pool_max = pool_max;
                    p.labels = zone
                        .map(|z| vec![Label::new("zone", z)])
                        .unwrap_or_default();
                    p
                },
            )
    }

    pub(crate) fn arb_input() -> impl Strategy<Value = SelectionInput> {
        (
            prop::sample::select(vec!["img-a", "img-b", ""]),
            prop::option::of(prop::sample::select(vec!["250m", "1", "1500m"])),
            prop::option::of(prop::sample::select(vec!["256Mi", "1Gi", "1000M"])),
            0u32..6,
            prop::option::of(prop::sample::select(vec!["a", "b"])),
            prop::collection::vec(arb_pool(), 0..6),
        )
            .prop_map(|(image, cpu, mem, replicas, zone, mut pools)| {
                // Pool names are unique within a namespace.
                pools.sort_by(|a, b| a.pool_name.cmp(&b.pool_name));
                pools.dedup_by(|a, b| a.pool_name == b.pool_name);
                let mut requests = vec![];
                if let Some(cpu) = cpu {
                    requests.push(("cpu", cpu));
                }
                if let Some(mem) = mem {
                    requests.push(("memory", mem));
                }
                let mut b = batch(image, &requests);
                b.replicas = replicas;
                b.template.node_selector = zone
                    .map(|z| vec![Label::new("zone", z)])
                    .unwrap_or_default();
                SelectionInput { batch: b, pools }
            })
    }

    proptest! {
        #[test]
        fn the_choice_fits_and_no_fitting_pool_is_less_allocated(input in arb_input()) {
            let d = least_allocated_fit(&input);
            prop_assert!(d.reason.len() <= MAX_REASON_BYTES);
            let fitting: Vec<&CandidatePool> = input.pools.iter().filter(|p| fits(&input.batch, p)).collect();
            match &d.pool {
                None => prop_assert!(fitting.is_empty(), "{:?} fit but none was chosen", fitting),
                Some(name) => {
                    let chosen = fitting.iter().find(|p| &p.pool_name == name);
                    prop_assert!(chosen.is_some(), "{} does not fit", name);
                    let chosen = chosen.unwrap();
                    for other in &fitting {
                        let order = freedom(other, chosen);
                        prop_assert!(order != Ordering::Greater, "{} is less allocated than {}", other.pool_name, name);
                        if order == Ordering::Equal {
                            prop_assert!(chosen.pool_name <= other.pool_name);
                        }
                    }
                }
            }
            // Every rejected pool is named in the reason.
            for p in input.pools.iter().filter(|p| !fits(&input.batch, p)) {
                prop_assert!(d.reason.contains(&format!("{}: ", p.pool_name)), "{} missing from {}", p.pool_name, d.reason);
            }
        }

        #[test]
        fn the_order_of_the_pools_does_not_matter(input in arb_input()) {
            let mut reversed = input.clone();
            reversed.pools.reverse();
            prop_assert_eq!(least_allocated_fit(&input), least_allocated_fit(&reversed));
        }
    }
}
