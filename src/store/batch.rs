//! Group commit for the writes on the issuance path: a pending record with its "requested"
//! event, an activation with its "issued" event, and lone audit events (denials).
//!
//! Each such write used to be a transaction of its own, and every transaction appends to the one
//! audit chain, so they ran one at a time: on SQLite behind the single writer, on PostgreSQL
//! behind the chain's advisory lock, each paying its own commit (and on PostgreSQL its own WAL
//! flush). Here callers queue their writes, and one task applies whatever has queued up since
//! its last commit in one transaction: each write's rows, then all of their events in one
//! chained `INSERT`, then one commit. Every write keeps its own all-or-nothing meaning:
//! - a write that is refused (limit reached, wrong state, an `Idempotency-Key` seen before)
//!   writes nothing, and appends no event, while the others in its batch go ahead;
//! - a write is answered only after its batch has committed;
//! - if the batch transaction fails as a whole, each of its writes is tried again in a
//!   transaction of its own, so one write's failure is never another's;
//! - a write whose caller has gone (client disconnect, request timeout) before its batch starts
//!   is dropped unwritten, as its own transaction would have been rolled back.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Activation, Idempotency, KeyRecord, KeyState, NewKey, Pending, StoreError};
use crate::domain::audit::NewAuditEvent;
use crate::domain::keys::{IDEMPOTENCY_WINDOW, limit_reached};
use crate::domain::keys::{KeyChange, Step};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 64;

/// One write of the issuance path, as queued.
pub(super) enum Write {
    Insert { key: NewKey, event: NewAuditEvent, now: DateTime<Utc> },
    Activate { activation: Activation, event: NewAuditEvent },
    Append { event: NewAuditEvent },
}

impl Write {
    /// The event the write appends if it goes ahead.
    pub(super) fn event(&self) -> &NewAuditEvent {
        match self {
            Write::Insert { event, .. } | Write::Activate { event, .. } | Write::Append { event } => event,
        }
    }
}

/// What a write did.
pub(super) enum Written {
    /// `Pending::Existing` wrote nothing and appended no event.
    Pending(Pending),
    Active(Box<KeyRecord>),
    Appended,
}

impl Written {
    /// Whether the write's event belongs in the chain.
    pub(super) fn appends(&self) -> bool {
        !matches!(self, Written::Pending(Pending::Existing { .. }))
    }
}

pub(super) type Outcome = Result<Written, StoreError>;

/// A backend's half: one transaction for a batch.
#[async_trait]
pub(super) trait Committer: Send + Sync + 'static {
    /// Applies `writes` in one transaction, in order, and commits. `Ok` holds one outcome per
    /// write, and an `Err` outcome means that write changed nothing. `Err` means the
    /// transaction failed (and was rolled back): nothing of the batch was written.
    async fn commit_batch(&self, writes: &[&Write]) -> Result<Vec<Outcome>, StoreError>;

    /// Whether the event with this id is in the chain: after a failed batch (its `COMMIT`'s
    /// answer may have been lost with the connection while the commit went through), each
    /// write's event is looked up before that write is tried again.
    async fn event_committed(&self, id: Uuid) -> Result<bool, StoreError>;
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Outcome>,
}

/// The queue in front of a [`Committer`]; its task ends when the queue is dropped.
pub(super) struct WriteQueue {
    jobs: mpsc::Sender<Job>,
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store's write queue has stopped".to_owned())
}

fn unexpected() -> StoreError {
    StoreError::Unavailable("the store answered a write with the wrong kind of result".to_owned())
}

impl WriteQueue {
    /// Starts the committing task on the current runtime.
    pub(super) fn start(committer: impl Committer) -> Self {
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(commit_queued(committer, queue));
        Self { jobs }
    }

    async fn submit(&self, write: Write) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { write, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub(super) async fn insert_pending(
        &self,
        key: &NewKey,
        event: &NewAuditEvent,
        now: DateTime<Utc>,
    ) -> Result<Pending, StoreError> {
        match self.submit(Write::Insert { key: key.clone(), event: event.clone(), now }).await? {
            Written::Pending(pending) => Ok(pending),
            _ => Err(unexpected()),
        }
    }

    pub(super) async fn activate(
        &self,
        activation: &Activation,
        event: &NewAuditEvent,
    ) -> Result<KeyRecord, StoreError> {
        match self.submit(Write::Activate { activation: activation.clone(), event: event.clone() }).await? {
            Written::Active(record) => Ok(*record),
            _ => Err(unexpected()),
        }
    }

    pub(super) async fn append(&self, event: &NewAuditEvent) -> Result<(), StoreError> {
        match self.submit(Write::Append { event: event.clone() }).await? {
            Written::Appended => Ok(()),
            _ => Err(unexpected()),
        }
    }
}

/// Commits what has queued up, batch after batch, until the queue is dropped.
async fn commit_queued(committer: impl Committer, mut queue: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        jobs.retain(|job| !job.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let outcomes = {
            let writes: Vec<&Write> = jobs.iter().map(|job| &job.write).collect();
            match committer.commit_batch(&writes).await {
                Ok(outcomes) if outcomes.len() == writes.len() => outcomes,
                Ok(_) => writes.iter().map(|_| Err(unexpected())).collect(),
                Err(e) if writes.len() <= 1 => vec![Err(e)],
                Err(e) => {
                    tracing::warn!(error = %e, writes = writes.len(), "a batch of writes failed; trying each alone");
                    let mut outcomes = Vec::with_capacity(writes.len());
                    for write in &writes {
                        // An ambiguous commit: read back before retrying anything.
                        match committer.event_committed(write.event().id).await {
                            Ok(true) => {
                                outcomes.push(committed_outcome(write));
                                continue;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                outcomes.push(Err(e));
                                continue;
                            }
                        }
                        let outcome = match committer.commit_batch(&[write]).await {
                            Ok(mut one) if one.len() == 1 => one.remove(0),
                            Ok(_) => Err(unexpected()),
                            Err(e) => Err(e),
                        };
                        outcomes.push(outcome);
                    }
                    outcomes
                }
            }
        };
        for (job, outcome) in jobs.drain(..).zip(outcomes) {
            // A caller that has gone since is told nothing; its write stands, as it would had
            // the answer been lost on the way.
            let _ = job.reply.send(outcome);
        }
    }
}

/// What a write whose event is found committed (its batch's answer lost) has done.
fn committed_outcome(write: &Write) -> Outcome {
    match write {
        Write::Insert { .. } => Ok(Written::Pending(Pending::Inserted)),
        // The record is active; the issuer reads it back (a key whose activation committed is
        // never deleted).
        Write::Activate { activation, .. } => Err(StoreError::Unavailable(format!(
            "the activation of {} committed but its answer was lost; read the record back",
            activation.id
        ))),
        Write::Append { .. } => Ok(Written::Appended),
    }
}

/// A record found by its requester's `Idempotency-Key`.
pub(super) struct Found {
    pub record: KeyRecord,
    pub idempotency_key: String,
    pub request_hash: Option<String>,
}

/// A [`Found`] from a row of `KEY_COLUMNS` followed by `request_hash` and `idempotency_key`.
pub(super) fn found_from_row<'r, R: sqlx::Row>(row: &'r R) -> Result<Found, StoreError>
where
    super::rows::KeyRow: sqlx::FromRow<'r, R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    Ok(Found {
        record: super::rows::key_from_row(row)?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_hash: row.try_get("request_hash")?,
    })
}

/// A backend's statements inside a batch transaction. The set-based ones take every write of a
/// kind at once, so a batch costs a handful of statements however many writes it holds; the rare
/// cases they leave go one at a time ([`insert_one`], [`activate_one`]), built on these.
#[async_trait]
pub(super) trait BatchTx: Send {
    /// Takes the requesters' locks, if the backend needs them (several replicas).
    async fn lock_requesters(&mut self, requesters: &[&str]) -> Result<(), StoreError>;
    /// Records holding any of the keys' (requester, `Idempotency-Key`) pairs.
    async fn find_idempotent(&mut self, keys: &[&NewKey]) -> Result<Vec<Found>, StoreError>;
    /// For each insert, in the order given: its requester's pending or active, unexpired records
    /// in its scope at its `now`; or, where the requester's holding in the scope (`key_holdings`,
    /// kept by triggers, which still counts records past their expiry) is below the insert's
    /// [`exact_below`] threshold, that holding, which decides the same and costs one row. A
    /// negative holding (only a hand edit of the table could make one) is never trusted.
    async fn limit_counts(&mut self, inserts: &[(&NewKey, DateTime<Utc>)]) -> Result<Vec<u64>, StoreError>;
    /// Writes the records `pending`, in the order given.
    async fn insert_keys(&mut self, keys: &[&NewKey]) -> Result<(), StoreError>;
    /// Makes pending records active; returns those that were pending.
    async fn activate_keys(
        &mut self,
        activations: &[(&Activation, DateTime<Utc>)],
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Lets a record's `Idempotency-Key` be used afresh (it is past the window).
    async fn free_idempotency_key(&mut self, id: Uuid) -> Result<(), StoreError>;
    /// A record, locked for the rest of the transaction; `NotFound` if there is none.
    async fn key(&mut self, id: Uuid) -> Result<KeyRecord, StoreError>;
    /// Appends the events, in order, to the chain.
    async fn append(&mut self, events: &[&NewAuditEvent]) -> Result<(), StoreError>;
    /// Moves a record from `from` to `to` at `at` (stamping `revoked_at` when `to` is revoked);
    /// false when it was not in `from`.
    async fn set_state(
        &mut self,
        id: Uuid,
        from: KeyState,
        to: KeyState,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
}

/// Applies `change` to record `id`, as the key's state machine ([`KeyState::on`]) allows, and
/// appends `event` when the record moved: the one implementation of `mark_failed`,
/// `mark_revoked` and `mark_expired` for both backends. Returns the record afterwards and
/// whether it moved; the caller commits only then.
pub(super) async fn apply_change(
    tx: &mut impl BatchTx,
    id: Uuid,
    change: KeyChange,
    at: DateTime<Utc>,
    event: &NewAuditEvent,
) -> Result<(KeyRecord, bool), StoreError> {
    if change == KeyChange::Activate {
        // An activation writes what Octopus returned; only `activate` (`activate_keys`) does it.
        return Err(StoreError::Unavailable("an activation goes through Store::activate".to_owned()));
    }
    let current = tx.key(id).await?;
    match current.state.on(change) {
        Step::Stay => Ok((current, false)),
        Step::Refused { expected } => Err(StoreError::WrongState { id, expected, actual: current.state }),
        Step::To(next) => {
            if !tx.set_state(id, current.state, next, at).await? {
                let actual = tx.key(id).await?.state;
                return Err(StoreError::WrongState { id, expected: current.state, actual });
            }
            tx.append(&[event]).await?;
            Ok((tx.key(id).await?, true))
        }
    }
}

/// For each insert, the holding below which its count need not be exact: with fewer than
/// `max_active` minus the batch's inserts for the same requester and scope, every one of those
/// inserts is within the limit, whether or not some held records have expired since.
pub(super) fn exact_below(inserts: &[(&NewKey, DateTime<Utc>)]) -> Vec<i64> {
    inserts
        .iter()
        .map(|(key, _)| {
            let same = inserts.iter().filter(|(k, _)| k.requester == key.requester && k.scope == key.scope).count();
            i64::from(key.max_active) - i64::try_from(same).unwrap_or(i64::MAX)
        })
        .collect()
}

/// What a batch does with one insert, decided from what the database holds.
#[derive(Debug, PartialEq)]
pub(super) enum InsertPlan {
    Insert,
    Existing {
        record: Box<KeyRecord>,
        same_request: bool,
    },
    Limit {
        active: u64,
    },
    /// Applied on its own after the batch's inserts: its `Idempotency-Key` is used by an earlier
    /// insert of the batch or is due to be freed, or an earlier insert of its requester was
    /// deferred so.
    OnItsOwn,
}

/// What a record already holding an insert's `Idempotency-Key` makes of it: within the window, a
/// replay of that record (of the same request or not); past it, nothing (the key may be reused).
/// A retry of the same request whose first attempt failed is not a replay either: a record is
/// `failed` only once its Octopus key is gone or was never made, so the retry runs the issuance
/// again (a pipeline that retries a 502, 503 or 504 with the same key gets its key).
fn replay(seen: &Found, idem: &Idempotency, now: DateTime<Utc>) -> Option<(Box<KeyRecord>, bool)> {
    let same_request = seen.request_hash.as_deref() == Some(idem.request_hash.as_str());
    if same_request && seen.record.state == super::KeyState::Failed {
        return None;
    }
    (seen.record.created_at > now - IDEMPOTENCY_WINDOW).then(|| (Box::new(seen.record.clone()), same_request))
}

/// One insert on its own, in the batch's transaction and after the requester's lock: the path for
/// what [`plan_inserts`] leaves (an `Idempotency-Key` used twice in one batch, or one due to be
/// freed). The batch's earlier inserts are written by then, so they count. Writes nothing unless
/// it returns `Inserted`.
async fn insert_one(tx: &mut impl BatchTx, key: &NewKey, now: DateTime<Utc>) -> Result<Pending, StoreError> {
    let mut to_free = None;
    if let Some(idem) = &key.idempotency {
        let found = tx.find_idempotent(&[key]).await?;
        if let Some(seen) = found.iter().find(|f| f.record.requester == key.requester && f.idempotency_key == idem.key)
        {
            if let Some((record, same_request)) = replay(seen, idem, now) {
                return Ok(Pending::Existing { record, same_request });
            }
            to_free = Some(seen.record.id);
        }
    }
    // Below its threshold the holding stands in for the count; at or above it the count is exact.
    let active = tx.limit_counts(&[(key, now)]).await?.first().copied().unwrap_or(u64::MAX);
    if limit_reached(active, key.max_active) {
        return Err(StoreError::LimitReached { active });
    }
    if let Some(id) = to_free {
        tx.free_idempotency_key(id).await?;
    }
    tx.insert_keys(&[key]).await?;
    Ok(Pending::Inserted)
}

/// One activation on its own (an id activated twice in one batch, or one not pending): writes
/// nothing unless it returns the record.
async fn activate_one(
    tx: &mut impl BatchTx,
    activation: &Activation,
    at: DateTime<Utc>,
) -> Result<KeyRecord, StoreError> {
    match tx.activate_keys(&[(activation, at)]).await?.pop() {
        Some(record) => Ok(record),
        None => {
            let current = tx.key(activation.id).await?;
            Err(StoreError::WrongState { id: activation.id, expected: KeyState::Pending, actual: current.state })
        }
    }
}

/// Decides each insert, in order, as if they ran one after another: `counts` are the database's
/// counts ([`BatchTx::limit_counts`]), to which the batch's earlier accepted inserts add.
pub(super) fn plan_inserts(inserts: &[(&NewKey, DateTime<Utc>)], found: &[Found], counts: &[u64]) -> Vec<InsertPlan> {
    let mut plans = Vec::with_capacity(inserts.len());
    for (i, (key, now)) in inserts.iter().enumerate() {
        let earlier = &inserts[..i];
        let deferred_requester =
            earlier.iter().zip(&plans).any(|((k, _), p)| k.requester == key.requester && *p == InsertPlan::OnItsOwn);
        let reused_in_batch = key.idempotency.as_ref().is_some_and(|idem| {
            earlier.iter().zip(&plans).any(|((k, _), p)| {
                k.requester == key.requester
                    && matches!(p, InsertPlan::Insert | InsertPlan::OnItsOwn)
                    && k.idempotency.as_ref().is_some_and(|i| i.key == idem.key)
            })
        });
        if deferred_requester || reused_in_batch {
            plans.push(InsertPlan::OnItsOwn);
            continue;
        }
        if let Some(idem) = &key.idempotency {
            let seen = found.iter().find(|f| f.record.requester == key.requester && f.idempotency_key == idem.key);
            if let Some(seen) = seen {
                plans.push(match replay(seen, idem, *now) {
                    Some((record, same_request)) => InsertPlan::Existing { record, same_request },
                    None => InsertPlan::OnItsOwn,
                });
                continue;
            }
        }
        let accepted = earlier
            .iter()
            .zip(&plans)
            .filter(|((k, _), p)| k.requester == key.requester && k.scope == key.scope && **p == InsertPlan::Insert)
            .count() as u64;
        let active = counts.get(i).copied().unwrap_or(u64::MAX).saturating_add(accepted);
        plans.push(if limit_reached(active, key.max_active) {
            InsertPlan::Limit { active }
        } else {
            InsertPlan::Insert
        });
    }
    plans
}

/// Applies a batch's writes in `tx`: the activations in one statement; requester locks; the
/// inserts, decided together and written in one statement; the rare cases one by one; then every
/// event of the writes that went ahead, in one append. Activations come first so that the locks
/// are taken in the order every other writer takes them: key rows, then the holdings that
/// inserts update, then the chain. A database error fails the batch; a
/// refusal (limit, state, replay) is that write's outcome, and it wrote nothing.
pub(super) async fn apply(tx: &mut impl BatchTx, writes: &[&Write]) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes: Vec<Option<Outcome>> = writes.iter().map(|_| None).collect();
    let mut inserts = Vec::new();
    let mut activations = Vec::new();
    for (i, write) in writes.iter().enumerate() {
        match write {
            Write::Insert { key, now, .. } => inserts.push((i, (key, *now))),
            Write::Activate { activation, event } => activations.push((i, (activation, event.occurred_at))),
            Write::Append { .. } => outcomes[i] = Some(Ok(Written::Appended)),
        }
    }

    if !activations.is_empty() {
        let pairs: Vec<(&Activation, DateTime<Utc>)> = activations.iter().map(|(_, p)| *p).collect();
        let mut activated = tx.activate_keys(&pairs).await?;
        for (i, (activation, at)) in activations {
            // An id activated twice in one batch: the first gets the record, the second is told
            // the record's state, as it would have been one after the other.
            outcomes[i] = match activated.iter().position(|r| r.id == activation.id) {
                Some(found) => Some(Ok(Written::Active(Box::new(activated.swap_remove(found))))),
                None => {
                    Some(refusal_or_fail(activate_one(tx, activation, at).await)?.map(|r| Written::Active(Box::new(r))))
                }
            };
        }
    }

    if !inserts.is_empty() {
        let pairs: Vec<(&NewKey, DateTime<Utc>)> = inserts.iter().map(|(_, p)| *p).collect();
        let mut requesters: Vec<&str> = pairs.iter().map(|(k, _)| k.requester.as_str()).collect();
        requesters.sort_unstable();
        requesters.dedup();
        tx.lock_requesters(&requesters).await?;
        let with_keys: Vec<&NewKey> = pairs.iter().map(|(k, _)| *k).filter(|k| k.idempotency.is_some()).collect();
        let found = if with_keys.is_empty() { Vec::new() } else { tx.find_idempotent(&with_keys).await? };
        let counts = tx.limit_counts(&pairs).await?;
        if counts.len() != pairs.len() {
            return Err(StoreError::Unavailable(format!("{} counts for {} inserts", counts.len(), pairs.len())));
        }
        let plans = plan_inserts(&pairs, &found, &counts);
        let accepted: Vec<&NewKey> =
            pairs.iter().zip(&plans).filter(|(_, p)| **p == InsertPlan::Insert).map(|((k, _), _)| *k).collect();
        if !accepted.is_empty() {
            tx.insert_keys(&accepted).await?;
        }
        let mut on_their_own = Vec::new();
        for ((i, pair), plan) in inserts.iter().zip(plans) {
            outcomes[*i] = match plan {
                InsertPlan::Insert => Some(Ok(Written::Pending(Pending::Inserted))),
                InsertPlan::Existing { record, same_request } => {
                    Some(Ok(Written::Pending(Pending::Existing { record, same_request })))
                }
                InsertPlan::Limit { active } => Some(Err(StoreError::LimitReached { active })),
                InsertPlan::OnItsOwn => {
                    on_their_own.push((*i, *pair));
                    None
                }
            };
        }
        for (i, (key, now)) in on_their_own {
            outcomes[i] = Some(refusal_or_fail(insert_one(tx, key, now).await)?.map(Written::Pending));
        }
    }

    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err(unexpected()))).collect();
    let events: Vec<&NewAuditEvent> = writes
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| outcome.as_ref().is_ok_and(Written::appends))
        .map(|(write, _)| write.event())
        .collect();
    tx.append(&events).await?;
    Ok(outcomes)
}

/// A refusal stays the write's outcome; a database error fails the batch.
fn refusal_or_fail<T>(result: Result<T, StoreError>) -> Result<Result<T, StoreError>, StoreError> {
    match result {
        Err(e) if !e.is_refusal() => Err(e),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::Semaphore;

    use super::*;
    use crate::domain::audit::{Action, Outcome as EventOutcome, RequestContext};

    /// Records each batch's actors; fails any batch holding a write by "poison"; holds each batch
    /// until the test lets it go.
    #[derive(Clone)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        gate: Arc<Semaphore>,
        /// Events of batches whose commit went through although it answered an error.
        committed: Arc<Mutex<Vec<Uuid>>>,
    }

    impl Default for Recorder {
        fn default() -> Self {
            Self { batches: Arc::default(), gate: Arc::new(Semaphore::new(0)), committed: Arc::default() }
        }
    }

    #[async_trait]
    impl Committer for Recorder {
        async fn commit_batch(&self, writes: &[&Write]) -> Result<Vec<Outcome>, StoreError> {
            let actors: Vec<String> = writes.iter().map(|w| w.event().actor.clone()).collect();
            self.batches.lock().unwrap().push(actors.clone());
            self.gate.acquire().await.unwrap().forget();
            if actors.iter().any(|a| a == "poison") {
                return Err(StoreError::Unavailable("poisoned".to_owned()));
            }
            if actors.iter().any(|a| a == "lost") {
                self.committed.lock().unwrap().extend(writes.iter().map(|w| w.event().id));
                return Err(StoreError::Unavailable("the connection died during COMMIT".to_owned()));
            }
            Ok(writes.iter().map(|_| Ok(Written::Appended)).collect())
        }

        async fn event_committed(&self, id: Uuid) -> Result<bool, StoreError> {
            Ok(self.committed.lock().unwrap().contains(&id))
        }
    }

    fn append(queue: &Arc<WriteQueue>, actor: &str) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        let queue = queue.clone();
        let event = NewAuditEvent::new(
            Utc::now(),
            actor,
            Action::KeyRequested,
            EventOutcome::Success,
            &RequestContext::default(),
        );
        tokio::spawn(async move { queue.append(&event).await })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_batch_whose_commit_answer_was_lost_is_read_back_not_written_again() {
        let recorder = Recorder::default();
        let queue = Arc::new(WriteQueue::start(recorder.clone()));
        let first = append(&queue, "first");
        settle().await;
        let queued: Vec<_> = ["b", "lost"].iter().map(|a| append(&queue, a)).collect();
        settle().await;
        recorder.gate.add_permits(100);
        first.await.unwrap().unwrap();
        for task in queued {
            task.await.unwrap().unwrap();
        }
        // The failed batch's events were found committed: nothing was tried again.
        let batches = recorder.batches.lock().unwrap().clone();
        assert_eq!(batches, [vec!["first"], vec!["b", "lost"]]);
    }

    #[tokio::test]
    async fn writes_queued_behind_a_batch_share_the_next_and_a_failure_is_retried_alone() {
        let recorder = Recorder::default();
        let queue = Arc::new(WriteQueue::start(recorder.clone()));
        let first = append(&queue, "first");
        settle().await;
        // While "first" is being committed, three more queue up; one of them fails.
        let queued: Vec<_> = ["b", "poison", "d"].iter().map(|a| append(&queue, a)).collect();
        settle().await;
        recorder.gate.add_permits(100);
        first.await.unwrap().unwrap();
        let mut results = Vec::new();
        for task in queued {
            results.push(task.await.unwrap());
        }
        assert!(results[0].is_ok());
        assert!(matches!(&results[1], Err(StoreError::Unavailable(m)) if m == "poisoned"));
        assert!(results[2].is_ok());
        let batches = recorder.batches.lock().unwrap().clone();
        assert_eq!(batches, [vec!["first"], vec!["b", "poison", "d"], vec!["b"], vec!["poison"], vec!["d"]]);
    }

    #[tokio::test]
    async fn a_write_whose_caller_has_gone_is_not_written() {
        let recorder = Recorder::default();
        let queue = Arc::new(WriteQueue::start(recorder.clone()));
        let first = append(&queue, "first");
        settle().await;
        let gone = append(&queue, "gone");
        let kept = append(&queue, "kept");
        settle().await;
        gone.abort();
        settle().await;
        recorder.gate.add_permits(100);
        first.await.unwrap().unwrap();
        kept.await.unwrap().unwrap();
        assert_eq!(recorder.batches.lock().unwrap().clone(), [vec!["first"], vec!["kept"]]);
    }

    fn key(requester: &str, max_active: u32, idem: Option<(&str, &str)>) -> NewKey {
        let now = Utc::now();
        NewKey {
            id: uuid::Uuid::new_v4(),
            scope: crate::domain::policy::ScopeName::parse("s").unwrap(),
            requester: requester.to_owned(),
            purpose: crate::domain::policy::Purpose::parse("p").unwrap(),
            octopus_user_id: "Users-1".to_owned(),
            created_at: now,
            expires_at: now + chrono::Duration::days(1),
            max_active,
            idempotency: idem.map(|(k, h)| super::super::Idempotency { key: k.to_owned(), request_hash: h.to_owned() }),
            requester_teams: Vec::new(),
            requested_by: None,
            ticket: None,
            deadline: None,
        }
    }

    fn found(k: &NewKey, created_at: DateTime<Utc>, hash: &str) -> Found {
        let idem = k.idempotency.as_ref().unwrap();
        Found {
            record: KeyRecord {
                seq: 7,
                id: k.id,
                scope: k.scope.clone(),
                requester: k.requester.clone(),
                purpose: k.purpose.clone(),
                state: super::super::KeyState::Active,
                octopus_user_id: k.octopus_user_id.clone(),
                octopus_key_id: None,
                key_hint: None,
                created_at,
                expires_at: k.expires_at,
                revoked_at: None,
                requested_by: None,
            },
            idempotency_key: idem.key.clone(),
            request_hash: Some(hash.to_owned()),
        }
    }

    #[test]
    fn the_holding_decides_alone_only_below_the_limit_less_the_batch_own_inserts() {
        let now = Utc::now();
        let (a1, a2, b1, a_other) = (key("alice", 5, None), key("alice", 5, None), key("bob", 3, None), {
            let mut k = key("alice", 5, None);
            k.scope = crate::domain::policy::ScopeName::parse("t").unwrap();
            k
        });
        let below = exact_below(&[(&a1, now), (&b1, now), (&a2, now), (&a_other, now)]);
        assert_eq!(below, [3, 2, 3, 4]);
    }

    #[test]
    fn inserts_of_a_batch_count_against_the_limit_in_order() {
        let now = Utc::now();
        let (a1, a2, a3, b1) =
            (key("alice", 3, None), key("alice", 3, None), key("alice", 3, None), key("bob", 3, None));
        let inserts = [(&a1, now), (&b1, now), (&a2, now), (&a3, now)];
        // Alice holds 1 already, Bob 3.
        let plans = plan_inserts(&inserts, &[], &[1, 3, 1, 1]);
        assert_eq!(
            plans,
            [InsertPlan::Insert, InsertPlan::Limit { active: 3 }, InsertPlan::Insert, InsertPlan::Limit { active: 3 }]
        );
    }

    #[test]
    fn a_seen_idempotency_key_replays_within_the_window_and_is_freed_on_its_own_after_it() {
        let now = Utc::now();
        let same = key("alice", 5, Some(("k1", "h1")));
        let other_body = key("alice", 5, Some(("k2", "h2")));
        let old = key("bob", 5, Some(("k1", "h1")));
        let after_old = key("bob", 5, None);
        let seen = [
            found(&same, now - chrono::Duration::hours(1), "h1"),
            found(&other_body, now - chrono::Duration::hours(1), "h1"),
            found(&old, now - IDEMPOTENCY_WINDOW - chrono::Duration::seconds(1), "h1"),
        ];
        let inserts = [(&same, now), (&other_body, now), (&old, now), (&after_old, now)];
        let plans = plan_inserts(&inserts, &seen, &[0, 0, 0, 0]);
        assert!(matches!(&plans[0], InsertPlan::Existing { same_request: true, record } if record.id == same.id));
        assert!(matches!(&plans[1], InsertPlan::Existing { same_request: false, .. }));
        // Freeing the old key is a write: on its own, and Bob's later insert follows it.
        assert_eq!(plans[2..], [InsertPlan::OnItsOwn, InsertPlan::OnItsOwn]);
    }

    #[test]
    fn an_idempotency_key_used_twice_in_one_batch_sends_the_second_on_its_own() {
        let now = Utc::now();
        let first = key("alice", 5, Some(("k1", "h1")));
        let retry = key("alice", 5, Some(("k1", "h1")));
        let other = key("carol", 5, Some(("k1", "h1")));
        let plans = plan_inserts(&[(&first, now), (&retry, now), (&other, now)], &[], &[0, 0, 0]);
        assert_eq!(plans, [InsertPlan::Insert, InsertPlan::OnItsOwn, InsertPlan::Insert]);
    }
}
