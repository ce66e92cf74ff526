"""The ChatFlow operator: reconciles ChatFlowRuns into Kubeflow PyTorchJobs running the trainer."""
