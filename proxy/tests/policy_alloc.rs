//! `Policy::evaluate` runs on every connection and request, so it must not allocate. A global
//! allocator can only be installed per binary, hence this separate test file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use moat_core::{SpiffeId, TrustDomain};
use moat_proxy::policy::{Policy, Verdict};

/// Counts allocations made by the current thread only, so the test harness's other threads
/// cannot disturb the measurement.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    // try_with: the allocator may run while thread-locals are being torn down.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

const POLICY: &str = r#"
apiVersion: moat.dev/v1
kind: Policy
default: audit
rules:
  - name: deny-admin-port
    action: deny
    ports: ["9000-9100"]
    from:
      - trustDomain: partner.example
      - unauthenticated: true
  - name: web-to-api
    ports: [8080, 8443]
    from:
      - identity: spiffe://partner.example/billing
      - serviceAccount: shop/web
  - name: shop
    from:
      - namespace: shop
  - name: mesh
    action: deny
    ports: [22]
    from:
      - authenticated: true
"#;

#[test]
fn policy_evaluate_does_not_allocate() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let policy = Policy::parse(POLICY, "policy.yaml", &td).unwrap();
    let builtin = Policy::builtin(&td);
    let ids: Vec<Option<SpiffeId>> = [
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/api",
        "spiffe://cluster.local/ns/other/sa/x",
        "spiffe://cluster.local/not/a/workload",
        "spiffe://partner.example/billing",
        "spiffe://partner.example/ns/shop/sa/web",
        "spiffe://elsewhere.example/x",
    ]
    .iter()
    .map(|s| Some(SpiffeId::parse(s).unwrap()))
    .chain([None])
    .collect();
    let ports = [22u16, 80, 8080, 8443, 9000, 9050, 9100, 65535];

    // Sanity: the loop really exercises every outcome, not just the default path.
    let mut seen = [false; 3];
    for id in &ids {
        for &port in &ports {
            let d = policy.evaluate(id.as_ref(), port);
            seen[d.verdict as usize] = true;
        }
    }
    assert_eq!(seen, [true; 3]);
    assert_eq!(Verdict::Allow as usize, 0);

    // Sanity: the counter does see this thread's allocations.
    let before = allocations();
    black_box(Vec::<u8>::with_capacity(black_box(16)));
    assert!(allocations() > before);

    let before = allocations();
    let mut allowed = 0usize;
    for i in 0..10_000usize {
        let id = ids[i % ids.len()].as_ref();
        let port = ports[(i / ids.len()) % ports.len()];
        let d = black_box(&policy).evaluate(black_box(id), black_box(port));
        allowed += usize::from(black_box(d).allowed());
        let d = black_box(&builtin).evaluate(black_box(id), black_box(port));
        allowed += usize::from(black_box(d.label()).len() > 4);
    }
    let after = allocations();
    black_box(allowed);
    assert_eq!(
        after - before,
        0,
        "evaluate allocated {} times",
        after - before
    );
}
