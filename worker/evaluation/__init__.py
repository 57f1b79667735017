"""Evaluation: measure a model's task skill and general ability, and search the sparsity.

data (JSONL sets read through the model sources), model (causal LMs from safetensors),
metrics (exact-match skill, completion loss, perplexity), measures (skill kept, forgetting left),
candidates (pruned models built in memory from one ranking per tensor), search (auto-sparsity),
plot and job (the evaluation stage of a job, and publishing its choice).
"""
