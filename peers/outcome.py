"""How a member that voted (sent DONE) but did not hear every other DONE learns the outcome.

Commit rule (rounds.py): a member commits when it holds DONE from *every* member with its
own digest, received before its vote timed out. A member that never sent DONE can never be
part of a commit, so it may abort at any time. A member that sent DONE and then timed out
is *stuck*: some member may have committed, or not. It publishes phase "stuck", stops
counting late DONEs, and decides from the members' heartbeat records (the signed round
record of each member):

- a member whose recent `commits` include this round  -> the round committed: commit;
- a member that aborted this round, or moved on to a later attempt or round without
  committing this one -> nobody can commit it: abort;
- every other member stuck too, or dead        -> nobody alive committed it: abort.
  (A dead member that did commit is now a minority of one; lineage.py heals it.)
- otherwise (someone still "data"/"voted", or its record still shows an earlier round
  because the last publication lags)             -> undecided: look again a moment later.

Pure function over records, so every stuck member reaches the same decision.
"""

from __future__ import annotations

from peers.records import PeerRecord

COMMIT, ABORT = "commit", "abort"


def resolve(
    me: str,
    where: tuple[int, int, int],
    rid: str,
    members: list[str],
    records: dict[str, PeerRecord],
) -> str | None:
    """`where` = (epoch, step, attempt) of round `rid`; `records`: live members' latest
    heartbeats (dead ones absent). Returns COMMIT, ABORT or None (undecided yet)."""
    undecided = False
    for pid in members:
        if pid == me:
            continue
        r = records.get(pid)
        if r is None:
            continue  # dead: counts as stuck
        if rid in r.commits:
            return COMMIT
        rs = r.round
        if rs is None:
            return ABORT  # it holds no trace of this round: it never voted in it
        if rs.rid == rid:
            if rs.phase == "aborted":
                return ABORT
            if rs.phase == "committed":
                return COMMIT  # its commits list may lag its phase by one publication
            if rs.phase != "stuck":
                undecided = True
            continue
        at = (rs.epoch, rs.step, rs.attempt)
        if at < where or (at == where and not rs.rid):
            undecided = True  # its record has not caught up with our round yet
            continue
        return ABORT  # it is in a later attempt or round and did not commit ours
    return None if undecided else ABORT
