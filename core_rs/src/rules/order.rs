//! Whole tables judged as if stably sorted by (`account_id`, `ts`): the backtest's
//! path, with no sort of the table.
//!
//! The backtest's contract is a stable sort of the ticks by (`account_id`, `ts`)
//! over its input files concatenated in path order, then the engine. Accounts are
//! independent, so only each account's own order matters: the rows are partitioned
//! by phase with a stable counting sort (the phase slots are dense whatever the
//! account ids; the id → slot lookup is the engine's table for compact ids and a
//! hash otherwise), each phase's run is checked for order, and only a run that is
//! out of order is sorted (stably by `ts`, or by (`ts`, `seq`) when the rows come
//! with an explicit input position). Then each run is judged whole, with the next
//! phases' state prefetched.

use std::mem::MaybeUninit;

use crate::error::{RuleError, RuleResult};
use crate::rules::engine::{
    group_order, prefetch, Engine, PhasePart, TickColumns, PREFETCH_ROWS_AHEAD,
};
use crate::rules::output::BatchOutput;

/// Slot of a row that no phase takes (unknown account or invalid values).
const NONE: u32 = u32::MAX;

/// The rank of a phase whose ticks are out of order (judged after the others).
const SKIP: u32 = NONE - 1;

/// How many runs ahead a phase's state is prefetched while one run is judged.
const PREFETCH_RUNS_AHEAD: usize = 2;

/// A tick of one run: `ts`, equity, balance.
type Tick = (i64, f64, f64);

/// What [`Engine::run_unordered`] found about the order of its input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrderStats {
    /// Phases with at least one tick.
    pub runs: u64,
    /// Of those, runs that were out of order and had to be sorted.
    pub sorted_runs: u64,
}

/// Rows per block when judging accounts whose ticks are in order: the unit
/// whose outputs are put in grouped order.
const BLOCK_ROWS: usize = 1 << 20;

/// Consecutive phase slots per bucket: the state of this many phases (464 bytes
/// each) stays within the L2 cache while their ticks are grouped and judged.
const BUCKET_SLOTS: usize = 1024;

impl Engine {
    /// Judge ticks given in any order, with exactly the outputs of one
    /// [`Engine::run`] over the same ticks stably sorted by (`account_id`, `ts`),
    /// or by (`account_id`, `ts`, `seq`) when `seq` is given.
    ///
    /// `seq`, one column per chunk, is each row's position in the original input
    /// (for rows that were shuffled on their way here, e.g. through hash
    /// partitions); without it the rows' position in `chunks` is their order.
    ///
    /// A first pass finds each row's phase and whether each phase's ticks are in
    /// order. The phases in order are judged from the input in arrival order,
    /// in blocks of [`BLOCK_ROWS`] rows whose outputs are put in grouped order;
    /// both on every thread of `Parallel` (the phases split among them). The
    /// rows of the others go through two stable counting-sort passes, each
    /// friendly to the caches — into buckets of [`BUCKET_SLOTS`] consecutive
    /// phases (few write streams), then each bucket's rows into one run per
    /// phase — and each run is sorted and judged.
    ///
    /// Memory: 4 bytes a row for the slots, 24 bytes a phase for the order
    /// pass, 4 MB a thread for a block's rows, and the threads' outputs until
    /// merged; then, for the rows of the phases out of order only, 28 bytes a
    /// row (36 with `seq`) plus their largest bucket once more.
    ///
    /// # Errors
    /// [`RuleError::BadBatch`] if columns differ in length or there are 2^32 rows
    /// or more.
    pub fn run_unordered(
        &mut self,
        chunks: &[TickColumns<'_>],
        seq: Option<&[&[u64]]>,
    ) -> RuleResult<(BatchOutput, OrderStats)> {
        check_lengths(chunks, seq)?;
        let epoch = self.begin_unordered();
        let mut out = BatchOutput::default();
        let (slot_of, mut counts, disordered) = self.slots_of(chunks, seq, &mut out);
        let runs = counts.iter().filter(|&&k| k > 0).count() as u64;
        // Accounts whose ticks come in order are judged straight from the input,
        // block by block; only the others are staged, sorted and judged after.
        self.judge_in_order(chunks, &slot_of, &disordered, epoch, &mut out);
        for (k, &bad) in counts.iter_mut().zip(&disordered) {
            if !bad {
                *k = 0;
            }
        }
        let mut stats = if disordered.iter().any(|&bad| bad) {
            match seq {
                None => self.judge_bucketed(chunks, slot_of, &counts, epoch, &mut out, |k, r| {
                    let c = &chunks[k];
                    (c.ts[r], c.equity[r], c.balance[r])
                }),
                Some(seq) => {
                    self.judge_bucketed(chunks, slot_of, &counts, epoch, &mut out, |k, r| {
                        let c = &chunks[k];
                        ((c.ts[r], c.equity[r], c.balance[r]), seq[k][r])
                    })
                }
            }
        } else {
            OrderStats::default()
        };
        stats.runs = runs;
        self.finish_unordered(&mut out);
        Ok((out, stats))
    }

    /// Each row's phase slot (or [`NONE`]), each slot's row count, and whether
    /// each slot's ticks are out of (`ts`, `seq`) order; unknown and invalid rows
    /// are counted in `out`.
    ///
    /// Two passes, each on the threads of [`Engine::run_unordered`]'s judging:
    /// the rows' slots (rows split in ranges), then each slot's count and order
    /// (slots split in ranges, every thread reading every row's slot).
    fn slots_of(
        &self,
        chunks: &[TickColumns<'_>],
        seq: Option<&[&[u64]]>,
        out: &mut BatchOutput,
    ) -> (Vec<u32>, Vec<u32>, Vec<bool>) {
        let n: usize = chunks.iter().map(|c| c.account_id.len()).sum();
        let threads = self.parallel().threads_for(n, self.len());
        // Each thread writes every row of its range: no fill first (at 10M rows
        // the fill and its page faults were a tenth of the call).
        let mut slot_of: Vec<u32> = Vec::with_capacity(n);
        let size = n.div_ceil(threads).max(1);
        let counted: Vec<(u64, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = slot_of.spare_capacity_mut()[..n]
                .chunks_mut(size)
                .enumerate()
                .map(|(k, range)| scope.spawn(move || self.lookup_rows(chunks, k * size, range)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        // SAFETY: the ranges cover rows 0..n and `lookup_rows` wrote every
        // element of its range (it asserts so); a panic in a thread would have
        // left this function before here.
        #[allow(unsafe_code)]
        unsafe {
            slot_of.set_len(n);
        }
        for (invalid, unknown) in counted {
            out.counts.invalid += invalid;
            out.counts.unknown += unknown;
        }
        let mut seen = vec![Seen::default(); self.len()];
        let size = self.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = seen
                .chunks_mut(size)
                .enumerate()
                .map(|(k, part)| {
                    let slot_of = &slot_of;
                    let base = u32::try_from(k * size).expect("fewer than 2^32 phases");
                    scope.spawn(move || count_rows(chunks, seq, slot_of, base, part))
                })
                .collect();
            for h in handles {
                h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            }
        });
        let counts = seen.iter().map(|p| p.count).collect();
        let disordered = seen.iter().map(|p| p.disordered).collect();
        (slot_of, counts, disordered)
    }

    /// The slots of the rows `start..start + slots.len()` (counting across
    /// `chunks`) into `slots`; returns the invalid and unknown rows' counts.
    fn lookup_rows(
        &self,
        chunks: &[TickColumns<'_>],
        start: usize,
        slots: &mut [MaybeUninit<u32>],
    ) -> (u64, u64) {
        let (mut invalid, mut unknown) = (0u64, 0u64);
        let mut last: Option<(i64, u32)> = None;
        let mut skip = start;
        let mut at = 0usize;
        for c in chunks {
            let len = c.account_id.len();
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = (len - skip).min(slots.len() - at);
            for r in skip..skip + take {
                let slot = if c.equity[r].is_finite() && c.balance[r].is_finite() {
                    let account = c.account_id[r];
                    let slot = match last {
                        Some((a, s)) if a == account => s,
                        _ => {
                            let s = self.lookup_slot(account);
                            last = Some((account, s));
                            s
                        }
                    };
                    unknown += u64::from(slot == NONE);
                    slot
                } else {
                    invalid += 1;
                    NONE
                };
                slots[at].write(slot);
                at += 1;
            }
            skip = 0;
            if at == slots.len() {
                break;
            }
        }
        assert_eq!(at, slots.len(), "every row of the range has its slot");
        (invalid, unknown)
    }

    /// Judge the ticks of the accounts whose ticks are in order, in blocks of
    /// [`BLOCK_ROWS`] rows, each row straight from the input in arrival order
    /// with the phase state of the row [`PREFETCH_ROWS_AHEAD`] rows on
    /// prefetched (the per-tick state is two cache lines, see `Hot` in
    /// `engine.rs`: no grouping pass, no staging buffer). Each block's outputs
    /// are then put in the order a grouping gives — by the phase's first row in
    /// the block, each phase's own rows in order (a stable sort) — so the
    /// outputs are the same, row for row and in order, as judging each phase's
    /// ticks of the block together.
    ///
    /// On a large table the phases are split into contiguous ranges of slots,
    /// one per thread (`Parallel`); every thread reads every row and judges
    /// those of its phases into outputs of its own, and each block's outputs
    /// of all threads are merged by that same key.
    fn judge_in_order(
        &mut self,
        chunks: &[TickColumns<'_>],
        slot_of: &[u32],
        disordered: &[bool],
        epoch: u64,
        out: &mut BatchOutput,
    ) {
        let threads = self.parallel().threads_for(slot_of.len(), self.len());
        let mut parts = self.phase_parts(threads);
        // Each phase's first row in the block (its key); NONE if not in the
        // block, SKIP if its ticks are out of order (judged later). One array
        // per part: one random access per row besides the phase state.
        let first_of = |part: &PhasePart<'_>| -> Vec<u32> {
            let lo = part.base() as usize;
            disordered[lo..lo + part.len()]
                .iter()
                .map(|&bad| if bad { SKIP } else { NONE })
                .collect()
        };
        if parts.len() <= 1 {
            if let Some(part) = parts.first_mut() {
                let mut first = first_of(part);
                judge_blocks(part, chunks, slot_of, &mut first, epoch, out, None);
            }
            return;
        }
        let judged: Vec<(BatchOutput, BlockKeys)> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|mut part| {
                    let mut first = first_of(&part);
                    scope.spawn(move || {
                        let mut own = BatchOutput::default();
                        let mut keys = BlockKeys::default();
                        judge_blocks(
                            &mut part,
                            chunks,
                            slot_of,
                            &mut first,
                            epoch,
                            &mut own,
                            Some(&mut keys),
                        );
                        (own, keys)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        merge_parts(judged, out);
    }

    /// Scatter the rows of the slots with a count into buckets of phases, then
    /// judge bucket by bucket.
    fn judge_bucketed<T: RunTick>(
        &mut self,
        chunks: &[TickColumns<'_>],
        slot_of: Vec<u32>,
        counts: &[u32],
        epoch: u64,
        out: &mut BatchOutput,
        row: impl Fn(usize, usize) -> T,
    ) -> OrderStats {
        let buckets = counts.len().div_ceil(BUCKET_SLOTS);
        // Exclusive prefix sums: where each bucket's rows start.
        let mut bounds = vec![0usize; buckets + 1];
        for (slot, &k) in counts.iter().enumerate() {
            bounds[slot / BUCKET_SLOTS + 1] += k as usize;
        }
        for b in 0..buckets {
            bounds[b + 1] += bounds[b];
        }
        let total = bounds[buckets];
        let mut staged: Vec<T> = vec![T::default(); total];
        let mut staged_slot: Vec<u32> = vec![0; total];
        let mut pos = bounds.clone();
        let mut i = 0usize;
        for (k, c) in chunks.iter().enumerate() {
            for r in 0..c.ts.len() {
                let slot = slot_of[i];
                i += 1;
                // Slots with no count here were judged already (in order).
                if slot != NONE && counts[slot as usize] > 0 {
                    let p = &mut pos[slot as usize / BUCKET_SLOTS];
                    staged[*p] = row(k, r);
                    staged_slot[*p] = slot;
                    *p += 1;
                }
            }
        }
        drop(slot_of);

        let mut stats = OrderStats::default();
        let biggest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut grouped: Vec<T> = vec![T::default(); biggest];
        let mut ends = [0u32; BUCKET_SLOTS];
        let mut runs: Vec<u32> = Vec::with_capacity(BUCKET_SLOTS);
        for b in 0..buckets {
            let (lo, hi) = (bounds[b], bounds[b + 1]);
            if lo == hi {
                continue;
            }
            let first = b * BUCKET_SLOTS;
            let last = (first + BUCKET_SLOTS).min(counts.len());
            // Each run's start within the bucket, in slot order.
            runs.clear();
            let mut at = 0u32;
            for slot in first..last {
                let k = counts[slot];
                if k > 0 {
                    runs.push(slot as u32);
                }
                ends[slot - first] = at;
                at += k;
            }
            for (t, &slot) in staged[lo..hi].iter().zip(&staged_slot[lo..hi]) {
                let p = &mut ends[slot as usize - first];
                grouped[*p as usize] = *t;
                *p += 1;
            }
            stats.runs += runs.len() as u64;
            let mut start = 0usize;
            for (g, &slot) in runs.iter().enumerate() {
                if let Some(&ahead) = runs.get(g + PREFETCH_RUNS_AHEAD) {
                    self.prefetch_slot(ahead);
                }
                let end = ends[slot as usize - first] as usize;
                let run = &mut grouped[start..end];
                if !run.windows(2).all(|w| !T::before(&w[1], &w[0])) {
                    T::sort(run);
                    stats.sorted_runs += 1;
                }
                self.judge_run(slot, epoch, run.iter().map(RunTick::tick), out);
                start = end;
            }
        }
        stats
    }
}

/// A grouped row: its tick, and how runs of them are ordered.
trait RunTick: Copy + Default {
    fn tick(&self) -> Tick;
    /// Whether `a` must be judged before `b` (strictly).
    fn before(a: &Self, b: &Self) -> bool;
    /// Sort a run into judging order, ties in their current order.
    fn sort(run: &mut [Self]);
}

impl RunTick for Tick {
    #[inline]
    fn tick(&self) -> Tick {
        *self
    }

    #[inline]
    fn before(a: &Self, b: &Self) -> bool {
        a.0 < b.0
    }

    fn sort(run: &mut [Self]) {
        // Stable: equal timestamps keep input order, as the backtest's sort does.
        run.sort_by_key(|t| t.0);
    }
}

impl RunTick for (Tick, u64) {
    #[inline]
    fn tick(&self) -> Tick {
        self.0
    }

    #[inline]
    fn before(a: &Self, b: &Self) -> bool {
        (a.0 .0, a.1) < (b.0 .0, b.1)
    }

    fn sort(run: &mut [Self]) {
        run.sort_unstable_by_key(|t| (t.0 .0, t.1));
    }
}

fn check_lengths(chunks: &[TickColumns<'_>], seq: Option<&[&[u64]]>) -> RuleResult<usize> {
    if let Some(seq) = seq {
        if seq.len() != chunks.len() {
            return Err(RuleError::BadBatch(
                "seq has another number of chunks than the ticks".to_owned(),
            ));
        }
    }
    let mut n = 0usize;
    for (k, c) in chunks.iter().enumerate() {
        let len = c.account_id.len();
        if c.ts.len() != len || c.equity.len() != len || c.balance.len() != len {
            return Err(RuleError::BadBatch("columns differ in length".to_owned()));
        }
        if seq.is_some_and(|s| s[k].len() != len) {
            return Err(RuleError::BadBatch(
                "seq differs in length from the ticks".to_owned(),
            ));
        }
        n += len;
    }
    if u32::try_from(n).is_err() {
        return Err(RuleError::BadBatch(
            "2^32 ticks or more in one table".to_owned(),
        ));
    }
    Ok(n)
}

/// What the order pass keeps per phase, together so that a row touches one
/// place (a random access per row is what this pass costs).
#[derive(Clone, Copy)]
struct Seen {
    latest: (i64, u64),
    count: u32,
    disordered: bool,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            latest: (i64::MIN, 0),
            count: 0,
            disordered: false,
        }
    }
}

/// List in `own` the rows of `slots` whose phase is one of `base..base +
/// phases`, in order, without a branch per row (with several threads, whether a
/// row is a thread's own is a coin toss); returns how many. `own` holds at
/// least `slots.len() + 1` entries.
fn own_rows(slots: &[u32], base: u32, phases: usize, own: &mut [u32]) -> usize {
    let mut n = 0usize;
    for (j, &slot) in slots.iter().enumerate() {
        own[n] = u32::try_from(j).expect("a block has fewer than 2^32 rows");
        n += usize::from((slot.wrapping_sub(base) as usize) < phases);
    }
    n
}

/// Rows per block of the order pass's compaction (`count_rows`).
const COUNT_BLOCK_ROWS: usize = 1 << 16;

/// Count the rows of the phases `base..base + part.len()` and check their
/// order, reading every row's slot: each block's rows of the part are listed
/// first (no branch per row), then taken with the record of the row
/// [`PREFETCH_ROWS_AHEAD`] on asked for ahead of its use.
fn count_rows(
    chunks: &[TickColumns<'_>],
    seq: Option<&[&[u64]]>,
    slot_of: &[u32],
    base: u32,
    part: &mut [Seen],
) {
    let phases = part.len();
    let mut own: Vec<u32> = vec![0; COUNT_BLOCK_ROWS + 1];
    let mut offset = 0usize;
    for (k, c) in chunks.iter().enumerate() {
        let len = c.ts.len();
        let mut lo = 0usize;
        while lo < len {
            let hi = (lo + COUNT_BLOCK_ROWS).min(len);
            let slots = &slot_of[offset + lo..offset + hi];
            let n = own_rows(slots, base, phases, &mut own);
            let local = |j: u32| (slots[j as usize] - base) as usize;
            for (m, &j) in own[..n].iter().enumerate() {
                if let Some(&ahead) = own[..n].get(m + PREFETCH_ROWS_AHEAD) {
                    prefetch(&part[local(ahead)]);
                }
                let p = &mut part[local(j)];
                p.count += 1;
                let r = lo + j as usize;
                let key = (c.ts[r], seq.map_or(0, |q| q[k][r]));
                if key < p.latest {
                    p.disordered = true;
                } else {
                    p.latest = key;
                }
            }
            lo = hi;
        }
        offset += len;
    }
}

/// Judge one part's phases of the rows in order, block by block (see
/// [`Engine::run_unordered`]); with `keys`, record each output's key and each
/// block's end for [`merge_parts`].
fn judge_blocks(
    part: &mut PhasePart<'_>,
    chunks: &[TickColumns<'_>],
    slot_of: &[u32],
    first: &mut [u32],
    epoch: u64,
    out: &mut BatchOutput,
    mut keys: Option<&mut BlockKeys>,
) {
    let mut groups: Vec<u32> = Vec::new();
    // The block's rows of this part's phases (`own_rows`), written up to the
    // block's row count before each read: sized once.
    let most = chunks
        .iter()
        .map(|c| c.ts.len().min(BLOCK_ROWS))
        .max()
        .unwrap_or(0);
    let mut own: Vec<u32> = vec![0; most + 1];
    let (base, phases) = (part.base(), part.len());
    let mut offset = 0usize;
    for c in chunks {
        let len = c.ts.len();
        let mut lo = 0usize;
        while lo < len {
            let hi = (lo + BLOCK_ROWS).min(len);
            let slots = &slot_of[offset + lo..offset + hi];
            let marks = (
                out.breaches.len(),
                out.daily.len(),
                out.transitions.len(),
                out.touched.len(),
            );
            groups.clear();
            let n = own_rows(slots, base, phases, &mut own);
            let own = &own[..n];
            let local = |j: u32| (slots[j as usize] - base) as usize;
            for (k, &j) in own.iter().enumerate() {
                if let Some(&ahead) = own.get(k + PREFETCH_ROWS_AHEAD) {
                    part.prefetch(local(ahead));
                }
                // Half way, the hot state is in: if that tick will take the
                // cold path (a new day, the first tick), fetch that too.
                if let Some(&ahead) = own.get(k + PREFETCH_ROWS_AHEAD / 2) {
                    part.prefetch_cold_if_due(local(ahead), c.ts[lo + ahead as usize]);
                }
                let i = local(j);
                let key = &mut first[i];
                if *key == SKIP {
                    continue;
                }
                if *key == NONE {
                    *key = j;
                    groups.push(u32::try_from(i).expect("fewer than 2^32 phases"));
                }
                let r = lo + j as usize;
                part.judge_tick(i, epoch, c.ts[r], c.equity[r], c.balance[r], out);
            }
            let key = |slot: u32| first[(slot - base) as usize];
            group_order(&mut out.breaches[marks.0..], |b| key(b.slot));
            group_order(&mut out.daily[marks.1..], |d| key(d.slot));
            group_order(&mut out.transitions[marks.2..], |t| key(t.slot));
            group_order(&mut out.touched[marks.3..], |&s| key(s));
            if let Some(keys) = keys.as_deref_mut() {
                keys.breaches
                    .extend(out.breaches[marks.0..].iter().map(|b| key(b.slot)));
                keys.daily
                    .extend(out.daily[marks.1..].iter().map(|d| key(d.slot)));
                keys.transitions
                    .extend(out.transitions[marks.2..].iter().map(|t| key(t.slot)));
                keys.touched
                    .extend(out.touched[marks.3..].iter().map(|&s| key(s)));
                keys.ends.push([
                    out.breaches.len(),
                    out.daily.len(),
                    out.transitions.len(),
                    out.touched.len(),
                ]);
            }
            for &g in &groups {
                first[g as usize] = NONE;
            }
            lo = hi;
        }
        offset += len;
    }
}

/// The key (the phase's first row in its block) of each output of one part,
/// and where each block's outputs end.
#[derive(Default)]
struct BlockKeys {
    breaches: Vec<u32>,
    daily: Vec<u32>,
    transitions: Vec<u32>,
    touched: Vec<u32>,
    ends: Vec<[usize; 4]>,
}

/// Append the parts' outputs to `out`, block by block, each block's merged by
/// key: the order one thread judging every phase gives (the parts' phases
/// differ, so no key is in two parts; one part's outputs of a key keep their
/// order).
fn merge_parts(judged: Vec<(BatchOutput, BlockKeys)>, out: &mut BatchOutput) {
    let blocks = judged.first().map_or(0, |(_, k)| k.ends.len());
    let mut breaches = Vec::with_capacity(judged.len());
    let mut daily = Vec::with_capacity(judged.len());
    let mut transitions = Vec::with_capacity(judged.len());
    let mut touched = Vec::with_capacity(judged.len());
    for (own, keys) in judged {
        let c = own.counts;
        out.counts.evaluated += c.evaluated;
        out.counts.late += c.late;
        out.counts.unknown += c.unknown;
        out.counts.inactive += c.inactive;
        out.counts.invalid += c.invalid;
        let ends = |n: usize| keys.ends.iter().map(|e| e[n]).collect::<Vec<_>>();
        breaches.push((own.breaches, keys.breaches, ends(0)));
        daily.push((own.daily, keys.daily, ends(1)));
        transitions.push((own.transitions, keys.transitions, ends(2)));
        touched.push((own.touched, keys.touched, ends(3)));
    }
    merge_by_key(breaches, blocks, &mut out.breaches);
    merge_by_key(daily, blocks, &mut out.daily);
    merge_by_key(transitions, blocks, &mut out.transitions);
    merge_by_key(touched, blocks, &mut out.touched);
}

/// A k-way merge by key, block by block, of `(rows, keys, block ends)` parts
/// whose rows are in key order within each block.
fn merge_by_key<T>(parts: Vec<(Vec<T>, Vec<u32>, Vec<usize>)>, blocks: usize, into: &mut Vec<T>) {
    into.reserve(parts.iter().map(|(rows, _, _)| rows.len()).sum());
    let mut heads: Vec<_> = parts
        .into_iter()
        .map(|(rows, keys, ends)| (rows.into_iter().zip(keys).peekable(), ends, 0usize))
        .collect();
    for b in 0..blocks {
        loop {
            let mut best: Option<(usize, u32)> = None;
            for (p, (rows, ends, taken)) in heads.iter_mut().enumerate() {
                if *taken < ends[b] {
                    if let Some(&(_, key)) = rows.peek() {
                        if best.is_none_or(|(_, k)| key < k) {
                            best = Some((p, key));
                        }
                    }
                }
            }
            let Some((p, _)) = best else {
                break;
            };
            let (rows, _, taken) = &mut heads[p];
            if let Some((row, _)) = rows.next() {
                into.push(row);
                *taken += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::config::{RuleSet, RuleValue};
    use crate::rules::engine::{Grouping, PhaseSpec, Status};

    fn rules() -> RuleSet {
        RuleSet::from_pairs(vec![
            ("initial_balance".to_owned(), RuleValue::Float(100_000.0)),
            ("max_daily_loss".to_owned(), RuleValue::Float(0.05)),
            ("max_total_loss".to_owned(), RuleValue::Float(0.1)),
            ("profit_target".to_owned(), RuleValue::Float(0.05)),
            ("warning_level".to_owned(), RuleValue::Float(0.5)),
            (
                "total_loss_mode".to_owned(),
                RuleValue::Str("trailing".to_owned()),
            ),
        ])
        .expect("valid rules")
    }

    fn engine(accounts: &[i64]) -> Engine {
        let mut e = Engine::new();
        for &a in accounts {
            e.register(PhaseSpec {
                account_id: a,
                challenge_id: format!("c-{a}"),
                phase_index: 0,
                started_at_us: 0,
                rules: rules(),
            })
            .expect("register");
        }
        e
    }

    /// A small xorshift: deterministic test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    struct Rows {
        account: Vec<i64>,
        ts: Vec<i64>,
        equity: Vec<f64>,
        balance: Vec<f64>,
    }

    impl Rows {
        fn cols(&self) -> TickColumns<'_> {
            TickColumns {
                account_id: &self.account,
                ts: &self.ts,
                equity: &self.equity,
                balance: &self.balance,
            }
        }

        fn permuted(&self, idx: &[usize]) -> Self {
            Self {
                account: idx.iter().map(|&i| self.account[i]).collect(),
                ts: idx.iter().map(|&i| self.ts[i]).collect(),
                equity: idx.iter().map(|&i| self.equity[i]).collect(),
                balance: idx.iter().map(|&i| self.balance[i]).collect(),
            }
        }
    }

    /// Random ticks over `accounts` (plus an unknown one), with many equal
    /// timestamps so tie order matters, and big swings so phases pass and fail.
    fn random_rows(seed: u64, n: usize, accounts: &[i64]) -> Rows {
        let mut rng = Rng(seed);
        let mut rows = Rows {
            account: vec![],
            ts: vec![],
            equity: vec![],
            balance: vec![],
        };
        for _ in 0..n {
            let k = (rng.next() % (accounts.len() as u64 + 1)) as usize;
            rows.account
                .push(accounts.get(k).copied().unwrap_or(999_999));
            rows.ts.push((rng.next() % 40) as i64 * 3_600_000_000);
            rows.equity.push(93_000.0 + (rng.next() % 14_000) as f64);
            rows.balance.push(100_000.0);
        }
        rows
    }

    /// Indices of a stable sort by (account, ts).
    fn sorted_order(rows: &Rows) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..rows.ts.len()).collect();
        idx.sort_by_key(|&i| (rows.account[i], rows.ts[i]));
        idx
    }

    fn outcome(e: &Engine, out: &BatchOutput) -> (Vec<String>, Vec<String>, String) {
        let mut breaches: Vec<String> = out
            .breaches
            .iter()
            .map(|b| format!("{} {:?}", e.phases()[b.slot as usize].spec.account_id, b))
            .collect();
        breaches.sort();
        let mut daily: Vec<String> = out
            .daily
            .iter()
            .map(|d| format!("{} {:?}", e.phases()[d.slot as usize].spec.account_id, d))
            .collect();
        daily.sort();
        let mut states: Vec<String> = e
            .phases()
            .iter()
            .map(|p| format!("{} {:?}", p.spec.account_id, p.state))
            .collect();
        states.sort();
        (breaches, daily, format!("{states:?} {:?}", out.counts))
    }

    #[test]
    fn threads_give_the_outputs_of_one_thread_row_for_row() {
        // Accounts split among 2, 3 and 7 threads: the same outputs, in the
        // same order, and the same phase states as on one thread; interleaved
        // in time, with one account's ticks reversed (judged after the others),
        // fully shuffled, and in three chunks (several blocks to merge).
        let accounts: Vec<i64> = (100..400).collect();
        for seed in [4u64, 5, 6] {
            let rows = random_rows(seed, 20_000, &accounts);
            let mut in_time: Vec<usize> = (0..rows.ts.len()).collect();
            in_time.sort_by_key(|&i| rows.ts[i]);
            let mut one_reversed = in_time.clone();
            let at: Vec<usize> = (0..one_reversed.len())
                .filter(|&j| rows.account[one_reversed[j]] == accounts[1])
                .collect();
            for (&a, &b) in at.iter().zip(at.iter().rev()).take(at.len() / 2) {
                one_reversed.swap(a, b);
            }
            let shuffled: Vec<usize> = (0..rows.ts.len()).collect();
            for order in [in_time, one_reversed, shuffled] {
                let case = rows.permuted(&order);
                let all = case.cols();
                let cuts = [0, 5_000, 5_001, all.ts.len()];
                let parts: Vec<TickColumns<'_>> = cuts
                    .windows(2)
                    .map(|w| TickColumns {
                        account_id: &all.account_id[w[0]..w[1]],
                        ts: &all.ts[w[0]..w[1]],
                        equity: &all.equity[w[0]..w[1]],
                        balance: &all.balance[w[0]..w[1]],
                    })
                    .collect();
                let mut one = engine(&accounts);
                one.set_threads(1);
                let (expected, expected_stats) =
                    one.run_unordered(&parts, None).expect("one thread");
                assert!(!expected.breaches.is_empty() && !expected.daily.is_empty());
                for threads in [2, 3, 7] {
                    let mut e = engine(&accounts);
                    e.force_threads(threads);
                    let (out, stats) = e.run_unordered(&parts, None).expect("threads");
                    assert_eq!(out.breaches, expected.breaches, "{seed} {threads}");
                    assert_eq!(out.daily, expected.daily, "{seed} {threads}");
                    assert_eq!(out.transitions, expected.transitions);
                    assert_eq!(out.touched, expected.touched);
                    assert_eq!(out.counts, expected.counts);
                    assert_eq!(stats, expected_stats);
                    assert_eq!(outcome(&e, &out), outcome(&one, &expected));
                }
            }
        }
    }

    #[test]
    fn in_order_accounts_keep_the_grouped_output_order() {
        // Every account in order but all interleaved (sorted by ts only): the
        // arrival-order path must give the outputs of a grouped `run` over the
        // same rows (one chunk, under one block), row for row and in order.
        let accounts: Vec<i64> = (100..400).collect();
        let rows = random_rows(4, 20_000, &accounts);
        let mut idx: Vec<usize> = (0..rows.ts.len()).collect();
        idx.sort_by_key(|&i| rows.ts[i]);
        let rows = rows.permuted(&idx);
        let mut grouped = Engine::with_grouping(Grouping::Always);
        let mut e = Engine::new();
        for &a in &accounts {
            for engine in [&mut grouped, &mut e] {
                engine
                    .register(PhaseSpec {
                        account_id: a,
                        challenge_id: format!("c-{a}"),
                        phase_index: 0,
                        started_at_us: 0,
                        rules: rules(),
                    })
                    .expect("register");
            }
        }
        let expected = grouped.run(&[rows.cols()]).expect("run");
        let (out, stats) = e.run_unordered(&[rows.cols()], None).expect("unordered");
        assert_eq!(stats.sorted_runs, 0);
        assert!(out.breaches.len() > 10 && !out.transitions.is_empty());
        assert_eq!(out.breaches, expected.breaches);
        assert_eq!(out.daily, expected.daily);
        assert_eq!(out.transitions, expected.transitions);
        assert_eq!(out.touched, expected.touched);
        assert_eq!(out.counts, expected.counts);
    }

    #[test]
    fn unordered_equals_sorted_then_run() {
        for (seed, accounts) in [
            (1u64, vec![1, 2, 3, 5, 8]),
            // Spread-out ids: the hash lookup, not the dense table.
            (2, vec![7, 1 << 40, -3, 1 << 50]),
            (3, (100..400).collect()),
        ] {
            let rows = random_rows(seed, 3_000, &accounts);
            let sorted = rows.permuted(&sorted_order(&rows));
            let mut reference = engine(&accounts);
            let expected = reference.run(&[sorted.cols()]).expect("run");

            let mut e = engine(&accounts);
            let (out, stats) = e.run_unordered(&[rows.cols()], None).expect("unordered");
            assert_eq!(
                outcome(&e, &out),
                outcome(&reference, &expected),
                "seed {seed}"
            );
            assert!(stats.sorted_runs > 0);
            assert!(e.phases().iter().any(|p| p.state.status != Status::Active));

            // Split into chunks, and with explicit input positions after a shuffle.
            let (a, b) = (rows.cols(), rows.cols());
            let cut = 1_234;
            let parts = [
                TickColumns {
                    account_id: &a.account_id[..cut],
                    ts: &a.ts[..cut],
                    equity: &a.equity[..cut],
                    balance: &a.balance[..cut],
                },
                TickColumns {
                    account_id: &b.account_id[cut..],
                    ts: &b.ts[cut..],
                    equity: &b.equity[cut..],
                    balance: &b.balance[cut..],
                },
            ];
            let mut e = engine(&accounts);
            let (out, _) = e.run_unordered(&parts, None).expect("chunks");
            assert_eq!(outcome(&e, &out), outcome(&reference, &expected));

            // Mixed: every account in order but the first, whose ticks stay
            // shuffled, interleaved with the others.
            let mut mixed: Vec<usize> = sorted_order(&rows)
                .into_iter()
                .filter(|&i| rows.account[i] != accounts[0])
                .collect();
            let first: Vec<usize> = (0..rows.ts.len())
                .filter(|&i| rows.account[i] == accounts[0])
                .collect();
            for (j, &i) in first.iter().enumerate() {
                mixed.insert((j * 7).min(mixed.len()), i);
            }
            let mut e = engine(&accounts);
            let (out, stats) = e
                .run_unordered(&[rows.permuted(&mixed).cols()], None)
                .expect("mixed");
            assert_eq!(outcome(&e, &out), outcome(&reference, &expected));
            assert_eq!(stats.sorted_runs, 1);

            let mut rng = Rng(seed + 100);
            let mut shuffle: Vec<usize> = (0..rows.ts.len()).collect();
            for i in (1..shuffle.len()).rev() {
                shuffle.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let shuffled = rows.permuted(&shuffle);
            let seq: Vec<u64> = shuffle.iter().map(|&i| i as u64).collect();
            let mut e = engine(&accounts);
            let (out, _) = e
                .run_unordered(&[shuffled.cols()], Some(&[&seq]))
                .expect("seq");
            assert_eq!(outcome(&e, &out), outcome(&reference, &expected));
        }
    }

    #[test]
    fn ordered_runs_are_not_sorted() {
        let accounts = [1, 2, 3];
        let rows = random_rows(9, 500, &accounts);
        let sorted = rows.permuted(&sorted_order(&rows));
        let mut e = engine(&accounts);
        let (_, stats) = e.run_unordered(&[sorted.cols()], None).expect("run");
        assert_eq!(
            stats,
            OrderStats {
                runs: 3,
                sorted_runs: 0
            }
        );
    }

    #[test]
    fn bad_lengths_are_refused() {
        let mut e = engine(&[1]);
        let cols = TickColumns {
            account_id: &[1, 1],
            ts: &[0],
            equity: &[1.0, 1.0],
            balance: &[1.0, 1.0],
        };
        assert!(matches!(
            e.run_unordered(&[cols], None),
            Err(RuleError::BadBatch(_))
        ));
        let cols = TickColumns {
            account_id: &[1],
            ts: &[0],
            equity: &[1.0],
            balance: &[1.0],
        };
        assert!(matches!(
            e.run_unordered(&[cols], Some(&[&[1, 2]])),
            Err(RuleError::BadBatch(_))
        ));
    }
}
