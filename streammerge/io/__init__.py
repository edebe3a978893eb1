"""Reading checkpoints and writing the merged model."""
