"""The core: the event vocabulary and `Callback` (events), the `Learner` and its loop (learner), the first-batch checks
and failure explanations (checks), devices (devices), ranks (ranks), state and looking without changing it (state),
nested tensors (nested), warnings (messages), atomic files and locks (files), notebook memory (memory), and the
course's plain loop (basic_loop). It imports nothing else from miniai."""
