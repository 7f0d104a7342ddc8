"""dllm.train: next-token training of a Llama over MPI, data- or tensor-parallel
(docs/training.md). python -m dllm.train is the command; see dllm.train.run."""
