"""Reading and writing datasets: Dataset and Batch, the chunk reader, the encode pipeline."""
