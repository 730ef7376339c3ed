// Runs an Argo CD health script the way Argo CD runs a custom health check
// (util/lua of Argo CD, `runLua` and `ExecuteHealthLua` with useOpenLibs
// off): gopher-lua, Argo CD's Lua, with only the package, base and table
// libraries opened; the object as the global `obj`, converted the way
// Argo CD's `decodeValue` converts it (every number a float64); the value the
// script returns read as the health.
//
//	gopherlua SCRIPT CASES.json   print one JSON line per case: name, status, message (or error)
//
// CASES.json is a list of {"name": ..., "obj": {...}} (tests/gitops/lua.py).
package main

import (
	"encoding/json"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
)

type testCase struct {
	Name string         `json:"name"`
	Obj  map[string]any `json:"obj"`
}

type answer struct {
	Name    string `json:"name"`
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func decodeValue(L *lua.LState, value any) lua.LValue {
	switch converted := value.(type) {
	case bool:
		return lua.LBool(converted)
	case float64:
		return lua.LNumber(converted)
	case string:
		return lua.LString(converted)
	case []any:
		arr := L.CreateTable(len(converted), 0)
		for _, item := range converted {
			arr.Append(decodeValue(L, item))
		}
		return arr
	case map[string]any:
		tbl := L.CreateTable(0, len(converted))
		for key, item := range converted {
			tbl.RawSetH(lua.LString(key), decodeValue(L, item))
		}
		return tbl
	}
	return lua.LNil
}

func run(script string, c testCase) answer {
	out := answer{Name: c.Name}
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			out.Error = err.Error()
			return out
		}
	}
	L.SetGlobal("obj", decodeValue(L, c.Obj))
	if err := L.DoString(script); err != nil {
		out.Error = err.Error()
		return out
	}
	hs, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		out.Error = fmt.Sprintf("the script returned a %s, not a table", L.Get(-1).Type())
		return out
	}
	status, statusOK := hs.RawGetString("status").(lua.LString)
	message, messageOK := hs.RawGetString("message").(lua.LString)
	if !statusOK || !messageOK {
		out.Error = "status and message must be strings"
		return out
	}
	out.Status, out.Message = string(status), string(message)
	return out
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: gopherlua SCRIPT CASES.json")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	data, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var cases []testCase
	if err := json.Unmarshal(data, &cases); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetEscapeHTML(false)
	for _, c := range cases {
		if err := encoder.Encode(run(string(script), c)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
