//! What readers (`ckpt-user`) see: the agent's pinned maps (`live`), and the tables and
//! JSON built from them (`locks`).

pub mod deleted;
pub mod live;
pub mod locks;
