//! Host bindings generated from `wit/` (one module per world), and their conversions to the
//! decision types of `sandbox-decisions` (the same conversions the default guests use). The
//! selection world's input types borrow, and [`selection::with_input`] lowers into them.

pub mod sizing {
    wasmtime::component::bindgen!({ world: "pool-sizing-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::pool_sizing as wit;
    sandbox_decisions::bridge_pool_sizing!(wit);
}

pub mod shard {
    wasmtime::component::bindgen!({ world: "shard-tasks-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::shard_tasks as wit;
    sandbox_decisions::bridge_shard_tasks!(wit);
}

pub mod selection {
    wasmtime::component::bindgen!({
        world: "pool-selection-policy",
        path: "../../wit",
        ownership: Borrowing { duplicate_if_necessary: true },
    });
    pub use exports::opensandbox::policy::pool_selection as wit;
    sandbox_decisions::bridge_pool_selection!(answers wit);

    use std::ops::Range;

    use sandbox_decisions::selection::{self, PodRequirements, SelectionInput};

    /// Runs `call` with `input` as WIT values that borrow its strings. Every candidate pool brings
    /// some ten strings, and copying them into owned values cost about a sixth of a selection;
    /// borrowed, the whole input takes five allocations. Each kind of record goes into one list,
    /// and the records above it take slices of that list, so lists are filled from the leaves up.
    pub fn with_input<R>(
        input: &SelectionInput,
        call: impl FnOnce(wit::SelectionInput<'_>) -> R,
    ) -> R {
        // The batch's template first, then each pool's.
        let templates: Vec<&PodRequirements> = std::iter::once(&input.batch.template)
            .chain(input.pools.iter().map(|p| &p.template))
            .collect();

        let mut labels = Vec::new();
        let mut requests = Vec::new();
        let pool_labels: Vec<Range<usize>> = input
            .pools
            .iter()
            .map(|pool| extend(&mut labels, &pool.labels, label))
            .collect();
        let selectors: Vec<Range<usize>> = templates
            .iter()
            .map(|t| extend(&mut labels, &t.node_selector, label))
            .collect();
        let container_requests: Vec<Range<usize>> = templates
            .iter()
            .flat_map(|t| &t.containers)
            .map(|c| {
                extend(&mut requests, &c.requests, |r| wit::ResourceRequest {
                    name: &r.name,
                    quantity: &r.quantity,
                })
            })
            .collect();

        let containers: Vec<wit::ContainerRequirements<'_>> = templates
            .iter()
            .flat_map(|t| &t.containers)
            .zip(container_requests)
            .map(|(c, range)| wit::ContainerRequirements {
                image: &c.image,
                requests: &requests[range],
            })
            .collect();
        let template_containers = templates.iter().scan(0, |start, t| {
            let range = *start..*start + t.containers.len();
            *start = range.end;
            Some(range)
        });

        let lowered_templates: Vec<wit::PodRequirements<'_>> = template_containers
            .zip(selectors)
            .map(|(cs, selector)| wit::PodRequirements {
                containers: &containers[cs],
                node_selector: &labels[selector],
            })
            .collect();
        let pools: Vec<wit::CandidatePool<'_>> = input
            .pools
            .iter()
            .zip(pool_labels)
            .zip(&lowered_templates[1..])
            .map(|((pool, pool_labels), template)| wit::CandidatePool {
                pool_name: &pool.pool_name,
                labels: &labels[pool_labels],
                template: template.clone(),
                bounds: bounds(&pool.bounds),
                total: pool.total,
                allocated: pool.allocated,
                idle: pool.idle,
            })
            .collect();
        call(wit::SelectionInput {
            batch: wit::BatchRequirements {
                batch_name: &input.batch.batch_name,
                replicas: input.batch.replicas,
                template: lowered_templates[0].clone(),
            },
            pools: &pools,
        })
    }

    /// Appends `items` to `list`; the range they take in it.
    fn extend<'a, T, U>(
        list: &mut Vec<U>,
        items: &'a [T],
        lower: impl Fn(&'a T) -> U,
    ) -> Range<usize> {
        let start = list.len();
        list.extend(items.iter().map(lower));
        start..list.len()
    }

    fn label(label: &selection::Label) -> wit::Label<'_> {
        wit::Label {
            key: &label.key,
            value: &label.value,
        }
    }

    fn bounds(bounds: &sandbox_decisions::sizing::Bounds) -> wit::Bounds {
        wit::Bounds {
            buffer_min: bounds.buffer_min,
            buffer_max: bounds.buffer_max,
            pool_min: bounds.pool_min,
            pool_max: bounds.pool_max,
        }
    }
}

pub mod expiry {
    wasmtime::component::bindgen!({ world: "expiry-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::expiry as wit;
    sandbox_decisions::bridge_expiry!(wit);
}
