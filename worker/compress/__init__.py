"""Weight pruning (prune "weights"): the second engine, beside the task vector's worker/engine/.

A model's weights are pruned with calibration activations, one decoder layer at a time
(ALGORITHMS.md "Task-aware weight pruning"): decoder.py walks the checkpoint layer by layer,
calibration.py reads and tokenizes the sets, hidden.py holds the calibration hidden states (in
memory or on disk), scores.py turns activation statistics into Wanda / magnitude masks (with the
task-aware fusion), sparsegpt.py is SparseGPT's OBS pruner, pipeline.py is the job. Sources,
writer, carry-over and publishing are worker/io/'s, evaluation is worker/evaluation/'s.
"""
