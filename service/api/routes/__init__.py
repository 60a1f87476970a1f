"""All routes, assembled into one router."""
from fastapi import APIRouter

from bna_gateway.service.api.routes import classify, health, metrics, model

api_router = APIRouter()
api_router.include_router(classify.router)
api_router.include_router(health.router)
api_router.include_router(model.router)
api_router.include_router(metrics.router)
