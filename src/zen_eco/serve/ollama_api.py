"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show) — being written."""

from fastapi import APIRouter

router = APIRouter()
