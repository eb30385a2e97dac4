"""What it takes to run SPIN for real, below the paper's files (spin.py, generate.py, loss.py,
data.py):

    flags, cli, recipes
                      the command line: Hugging Face's flag names, the paper's recipe, validation
    prepare           the model, the data and their tokens, checked before anything is written
    rundir, checkpoint, steps, preemption
                      the run directory: what is done, resume after a kill or a scheduler's signal
    distributed, backends
                      ranks (sharded generation and scoring) and DeepSpeed ZeRO-3 training
    models            loading a model: a directory, the Hub, a GGUF file, the toy
    logps, batching   the fast log p(y|x): the head on response positions, fused; packed rows
    evaluation, report, plot, hub
                      held-out numbers, lm-evaluation-harness, the printed table, trackers, the Hub

Imports point one way: these modules use the paper's files, never the reverse
(tests/test_architecture.py)."""
