"""The batch engine behind FalBatchRunOperator: many inputs of one model, sync or through the queue."""
