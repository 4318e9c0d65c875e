"""How far the sliding-window caches can roll back, and so how many drafts one round may hold.
No MLX here: the command line checks --draft-tokens before anything heavy loads."""

# Rollback room of the sliding-window caches (models/cache.py), in positions.
DEFAULT_SLACK = 64


def max_draft_tokens(slack: int = DEFAULT_SLACK) -> int:
    """The most drafts one round may verify with sliding caches of this slack. A round writes
    its K + 1 tokens and rolls back at most its K drafts (also when the answer ends inside the
    round: the round's first token was emitted before it), and a sliding cache can roll back
    slack - 1 positions (`SlidingWindowCache.max_rollback`: the drafter reads one key more than
    the window)."""
    return slack - 1
