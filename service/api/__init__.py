"""HTTP layer: dependencies, error handlers, middleware and routes."""
